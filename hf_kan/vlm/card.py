"""The model card (README.md) of a Shapes VQA model written by ``hf-kan vlm-train``.

``LlavaForConditionalGeneration.save_pretrained`` writes no card, so the trainer renders one: front matter
(``library_name: transformers``, ``pipeline_tag: image-text-to-text``, tags, license, test accuracy per question
type as ``model-index`` results) and a body with usage, the recipe, the exact command, and the measured figures.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from ..data.shapes_vqa import CHANCE_LEVELS

DATASET_NAME = "Shapes VQA (procedural, hf_kan.data.shapes_vqa)"


def training_command(args: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The ``hf-kan vlm-train`` command line that reproduces ``args`` (options that differ from ``defaults``)."""
    parts = ["hf-kan vlm-train"]
    for name, value in args.items():
        if name in ("progress_bar",) or defaults.get(name) == value:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            parts.append(f"{flag} {value!r}" if isinstance(value, str) and (not value or " " in value)
                         else f"{flag} {value}")
    return " ".join(parts)


def _accuracy_table(metrics: dict[str, Any]) -> str:
    test = metrics["test"]
    lines = ["| question type | test accuracy | chance | test rows |", "|---|---|---|---|"]
    for kind, acc in test["accuracy"].items():
        if kind in ("mean", "overall"):
            continue
        lines.append(f"| {kind} | {acc:.4f} | {CHANCE_LEVELS.get(kind, float('nan')):.3f} | {test['count'][kind]} |")
    lines.append(f"| mean of the five types | {test['accuracy']['mean']:.4f} | | |")
    return "\n".join(lines)


def _calibration_section(calibration: dict[str, Any], reference: dict[str, Any] | None) -> str:
    """The card section listing what ``hf-kan vlm-package`` calibrated on the model (see ``calibration.json``)."""
    var, dyvte = calibration["var"], calibration["dyvte"]
    ratio = var["max_score"] / var["median_score"]
    scores = ", ".join(f"{v:.2f}" for v in var["scores"])
    lines = [
        "## hf-kan patches calibrated on this model",
        "",
        "The `hf_kan` section of the text config holds three patches calibrated on this model by `hf-kan vlm-package`"
        " (all three on when loaded with `hf_kan.patches.from_pretrained`; turn them off with"
        " `hf_kan.patches.apply(model, prune=False, var=False, dyvte=False)`):",
        "",
        f"- `prune`: FastV with attention debiasing, positional trend b = {calibration['prune_trend']:.6g}"
        f" (T(i) = exp(-b i), fitted on {calibration['calibration_images']} validation scenes).",
        f"- `var`: sink dimensions {var['sink_dims']} (first-token |x_d / RMS(x)| {scores}"
        f" vs a median of {var['median_score']:.2f} over all dimensions: {ratio:.1f}x; VAR's published sink dimensions"
        " stand tens of times above the rest, so this model has no massive activations to speak of).",
        f"- `dyvte`: exit routers trained on it (router test accuracy {dyvte.get('test_accuracy', float('nan')):.3f}).",
    ]
    if reference is not None:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in reference["accuracy"].items())
        lines += ["", f"With every patch off, the first {reference['limit']} test questions score: {shown}."]
    return "\n".join(lines) + "\n"


def render_vlm_card(model: Any, args: dict[str, Any], metrics: dict[str, Any],
                    calibration: dict[str, Any] | None = None, reference: dict[str, Any] | None = None) -> str:
    """The README.md text for ``model`` trained with ``args`` (a dict of :class:`VLMTrainingArguments` fields);
    with ``calibration`` (``calibration.json`` of ``hf-kan vlm-package``) it also lists the calibrated patches and
    loads the model with them."""
    from .. import __version__
    from .arguments import VLMTrainingArguments

    tower = "KAT (Group-Rational KAN MLPs)" if args["tower"] == "kat" else "CLIP ViT (GELU MLPs)"
    title = f"shapes-vqa-llava-{args['tower']}{'-mma' if args['mma'] else ''}"
    results = [
        EvalResult(task_type="visual-question-answering", dataset_type="shapes-vqa", dataset_name=DATASET_NAME,
                   dataset_split="test", metric_type="accuracy", metric_name=f"accuracy ({kind})",
                   metric_value=round(acc, 4))
        for kind, acc in metrics["test"]["accuracy"].items() if kind != "overall"
    ]
    data = ModelCardData(library_name="transformers", pipeline_tag="image-text-to-text", license="apache-2.0",
                         tags=["hf-kan", "llava", args["tower"], "vqa"], model_name=title, eval_results=results)
    defaults = VLMTrainingArguments().__dict__
    command = training_command(args, defaults)
    num_parameters = sum(p.numel() for p in model.parameters())
    mma = (
        "Trained with modality-mutual attention (AKI's MMA: image tokens also attend to the question that follows "
        "them); the `hf_kan` section of the text config enables it, so load with "
        "`hf_kan.patches.from_pretrained(LlavaForConditionalGeneration, path)`."
        if args["mma"] else "Trained with plain causal attention (no hf-kan patch on)."
    )
    patched = bool(args["mma"] or calibration)
    patches_import = "from hf_kan import patches\n" if patched else ""
    load = (
        'patches.from_pretrained(LlavaForConditionalGeneration, "path/to/this/model")  # with its hf_kan patches'
        if patched else 'LlavaForConditionalGeneration.from_pretrained("path/to/this/model")'
    )
    body = f"""
# {title}

A {num_parameters:,}-parameter LLaVA (`LlavaForConditionalGeneration`) whose vision tower is a {tower}, trained
from scratch by hf-kan {__version__} on the procedural Shapes VQA data set (48 px scenes of 1-6 coloured shapes on a
3 x 3 grid; questions about colour, shape, presence, count and relative position, one-word answers). {mma}

## Usage

```python
import hf_kan  # registers the KAT model type (the vision tower) with the Auto classes
from transformers import AutoProcessor, LlavaForConditionalGeneration
from hf_kan.data.shapes_vqa import load_shapes_vqa
from hf_kan.vlm.processing import prompt_text
{patches_import}
model = {load}
processor = AutoProcessor.from_pretrained("path/to/this/model")
row = load_shapes_vqa(train_size=0, validation_size=0, test_size=10)["test"][0]
inputs = processor(images=[row["image"]], text=[prompt_text(processor, row["question"])], return_tensors="pt")
answer = processor.batch_decode(model.generate(**inputs, max_new_tokens=3)[:, inputs["input_ids"].shape[1]:],
                                skip_special_tokens=True)[0]
```

## Evaluation

Teacher-forced greedy answer accuracy on the test split ({sum(metrics['test']['count'].values())} rows), model
selected at step {metrics['best_step']} of {metrics['steps']} by mean validation accuracy:

{_accuracy_table(metrics)}

## Training

```bash
{command}
```

{metrics['num_processes']} process(es), {metrics['train_runtime_s'] / 60:.0f} min of training on
{'CPU' if args.get('cpu') or not _has_gpu() else 'GPU'}. Parameters the loss never reaches were frozen:
{', '.join(f'`{n}`' for n in metrics['frozen_parameters']) or 'none'}.
"""
    if calibration is not None:
        body += "\n" + _calibration_section(calibration, reference)
    return "---\n" + data.to_yaml() + "\n---\n" + body


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def write_vlm_card(output_dir: str, model: Any, args: dict[str, Any], metrics: dict[str, Any],
                   calibration: dict[str, Any] | None = None, reference: dict[str, Any] | None = None) -> str:
    """Write ``README.md`` (see :func:`render_vlm_card`) into ``output_dir``; returns its path."""
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_vlm_card(model, args, metrics, calibration, reference))
    return path


__all__ = ["render_vlm_card", "training_command", "write_vlm_card"]
