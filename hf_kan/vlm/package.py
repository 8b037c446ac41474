"""``hf-kan vlm-package``: turn a trained Shapes VQA model directory into the model shipped inside the package.

    hf-kan vlm-package outputs/shapes-vlm-kat                 # writes hf_kan/assets/shapes_vqa_kat/
    hf-kan vlm-package MODEL_DIR --output-dir DIR             # anywhere else

Steps, on a copy of ``MODEL_DIR`` (model, processor, card, ``metrics.json``) in ``--output-dir``:

1. ``hf-kan calibrate-prune OUT --images IMAGES --prompt "how many shapes are there ?" --save``: the positional
   trend of FastV's visual-token scores, fitted on ``--calibration-images`` scenes of the Shapes VQA *validation*
   stream (never the test split that ``hf-kan eval`` scores); stored as ``prune`` (FastV, debias on) in the config.
2. ``hf-kan calibrate-var OUT --save``: VAR's sink dimensions (largest first-token ``|x_d / RMS(x)|``); stored as
   ``var``. ``calibration.json`` records the scores of the chosen dimensions next to the median over all dimensions,
   so whether the model has massive activations at all can be read off (VAR assumes it does).
3. DyVTE routers: ``hf_kan.patches.dyvte.train.train_routers`` (what ``hf-kan dyvte-train`` runs) on Shapes VQA
   questions instead of that command's generated random-word prompts: ``--router-train-samples`` rows of a fresh
   training stream (data seed 1, scenes the model was not trained on), router validation and test rows
   (``--router-eval-samples`` each) from the validation stream after the calibration images. The routers are trained
   with every other patch off (how ``hf-kan eval``'s ``dyvte`` setting runs them) and saved in ``model.safetensors``;
   ``dyvte`` is stored in the config.
4. The reference figure: the output model, every patch off, on the first ``--reference-limit`` rows of the
   ``hf_kan_shapes_vqa`` test split (``hf_kan.eval.evaluate_task``); written with a tolerance to
   ``reference_scores.json``, which the README quotes and ``tests/vlm/test_vlm_shipped.py`` checks.

The config then holds the three calibrated patches as saved by those commands (``prune``, ``var``, ``dyvte``), so
``hf_kan.patches.from_pretrained`` turns them all on; ``hf-kan eval`` evaluates each alone and ``off`` turns them
off. A plain ``from_pretrained`` (``sdpa``) refuses to run a config with patches on: use
``hf_kan.vlm.load_pretrained()``, which loads with ``attn_implementation="hf_kan"`` and attaches them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..errors import HFKanConfigError
from .modeling import use_rational_backend
from .pretrained import REFERENCE_FILE, SHIPPED_MODEL, assets_dir

logger = logging.get_logger(__name__)

CALIBRATION_PROMPT = "how many shapes are there ?"
CALIBRATION_FILE = "calibration.json"
#: files of a trained model directory that are not copied into the package
SKIPPED_FILES = frozenset({"history.jsonl", "log.txt"})
DEFAULT_TOLERANCE = 0.01


def copy_model(model_dir: str | Path, output_dir: str | Path) -> Path:
    """Copy the files of ``model_dir`` (a ``save_pretrained`` directory written by ``hf-kan vlm-train``) into
    ``output_dir``, replacing what is there; returns ``output_dir``."""
    src, out = Path(model_dir), Path(output_dir)
    if not (src / "config.json").is_file() or not (src / "model.safetensors").is_file():
        raise HFKanConfigError(f"{src} is not a trained model directory (no config.json / model.safetensors); "
                               "train one with `hf-kan vlm-train --output-dir DIR`")
    if src.resolve() == out.resolve():
        raise HFKanConfigError("--output-dir must differ from the model directory (the model is copied there)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in SKIPPED_FILES:
            shutil.copy2(path, out / path.name)
    return out


def _validation_rows(start: int, count: int) -> list[dict[str, Any]]:
    """Rows ``start .. start + count`` of the Shapes VQA validation stream (seed 0)."""
    from itertools import islice

    from ..data.shapes_vqa import generate_shapes_vqa, split_seed

    return list(islice(generate_shapes_vqa(start + count, seed=split_seed(0, "validation")), start, None))


def calibrate_prune(model_dir: Path, num_images: int) -> float:
    """Step 1: run ``hf-kan calibrate-prune`` on ``num_images`` validation scenes; returns the stored trend."""
    from ..cli import main as cli

    with tempfile.TemporaryDirectory() as images:
        for i, row in enumerate(_validation_rows(0, num_images)):
            row["image"].save(Path(images) / f"{i:04d}.png")
        code = cli(["calibrate-prune", str(model_dir), "--images", images, "--num-images", str(num_images),
                    "--prompt", CALIBRATION_PROMPT, "--save"])
    if code:
        raise HFKanConfigError(f"hf-kan calibrate-prune failed on {model_dir}")
    return float(json.loads((model_dir / "config.json").read_text())["text_config"]["hf_kan"]["prune"]["trend"])


def calibrate_var(model_dir: Path, num_dims: int = 2) -> dict[str, Any]:
    """Step 2: run ``hf-kan calibrate-var --save``; returns the chosen dimensions with their scores and the median
    score over all dimensions (a massive-activation dimension scores far above the median)."""
    from transformers import AutoModelForImageTextToText

    from ..cli import main as cli
    from ..patches.var.calibrate import sink_dim_scores

    if cli(["calibrate-var", str(model_dir), "--num-dims", str(num_dims), "--save"]):
        raise HFKanConfigError(f"hf-kan calibrate-var failed on {model_dir}")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation={"text_config": "hf_kan"})
    from .. import patches

    patches.apply(model, prune=False, var=False)  # the scores are the unpatched first-token activations
    scores = sink_dim_scores(model).float()
    dims = json.loads((model_dir / "config.json").read_text())["text_config"]["hf_kan"]["var"]["sink_dims"]
    return {"sink_dims": dims, "scores": [float(scores[d]) for d in dims],
            "median_score": float(scores.median()), "max_score": float(scores.max())}


def _router_batches(processor: Any, rows: list[dict[str, Any]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Left-padded DyVTE training batches (``input_ids``, ``attention_mask``, ``pixel_values``, ``labels`` = answer
    and ``</s>``) of Shapes VQA ``rows``."""
    from ..patches.dyvte.data import collate
    from .batches import VQACollator

    single = VQACollator(processor)
    samples = []
    for row in rows:
        batch = single([row])
        samples.append({"input_ids": batch["input_ids"][0], "labels": batch["labels"][0],
                        "pixel_values": batch["pixel_values"][0]})
    pad = processor.tokenizer.pad_token_id
    return [collate(samples[i:i + batch_size], pad) for i in range(0, len(samples), batch_size)]


def train_dyvte(model_dir: Path, train_samples: int, eval_samples: int, offset: int, *, batch_size: int = 32,
                epochs: int = 2, learning_rate: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Step 3: train DyVTE routers on Shapes VQA rows with every other patch off, then save the model with the
    routers and the config with ``prune``, ``var`` (as stored by steps 1-2) and ``dyvte``; returns the router
    metrics of ``train_routers``."""
    from itertools import islice

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import patches
    from ..data.shapes_vqa import generate_shapes_vqa, split_seed
    from ..patches.dyvte.train import train_routers

    model = patches.from_pretrained(AutoModelForImageTextToText, model_dir).eval()
    use_rational_backend(model, "reference")
    processor = AutoProcessor.from_pretrained(model_dir)
    saved = patches.status(model)["patches"]
    patches.apply(model, prune=False, var=False, dyvte=True)
    train_rows = list(islice(generate_shapes_vqa(train_samples, seed=split_seed(seed + 1, "train")), train_samples))
    held_out = _validation_rows(offset, 2 * eval_samples)
    metrics = train_routers(
        model, _router_batches(processor, train_rows, batch_size),
        validation=_router_batches(processor, held_out[:eval_samples], batch_size),
        test=_router_batches(processor, held_out[eval_samples:], batch_size),
        epochs=epochs, learning_rate=learning_rate, eval_steps=max(train_samples // batch_size // 4, 1), seed=seed,
    )
    patches.apply(model, prune=saved.get("prune") or False, var=saved.get("var") or False)
    model.save_pretrained(model_dir)
    return {k: v for k, v in metrics.items() if k not in ("history", "selection")}


def reference_scores(model_dir: Path, limit: int, tolerance: float) -> dict[str, Any]:
    """Step 4: accuracy of ``model_dir`` with every patch off on the first ``limit`` test rows of
    ``hf_kan_shapes_vqa`` (per question type and overall), with the tolerance the shipped-model test allows."""
    from ..eval import PatchSetting, Runner, evaluate_task

    runner = Runner.from_pretrained(str(model_dir), batch_size=16, efficiency=False)
    use_rational_backend(runner.model, "reference")
    result = evaluate_task(runner, "hf_kan_shapes_vqa", [PatchSetting.off()], limit=limit)[0]
    accuracy = {k.split("/", 1)[1]: v for k, v in result.metrics.items() if k.startswith("answer_accuracy/")}
    accuracy["overall"] = result.metrics["answer_accuracy"]
    return {"task": "hf_kan_shapes_vqa", "split": result.split, "limit": limit, "setting": "off",
            "accuracy": accuracy, "tolerance": tolerance,
            "command": f"hf-kan eval --limit {limit}  (its unpatched row)"}


def rewrite_card(model_dir: Path, calibration: dict[str, Any], reference: dict[str, Any]) -> None:
    """Re-render the copied model card so that it loads the model with its calibrated patches and lists them."""
    from transformers import LlavaForConditionalGeneration

    from .. import patches
    from .card import write_vlm_card

    args = json.loads((model_dir / "training_args.json").read_text())
    metrics = json.loads((model_dir / "metrics.json").read_text())
    model = patches.from_pretrained(LlavaForConditionalGeneration, str(model_dir))
    write_vlm_card(str(model_dir), model, args, metrics, calibration, reference)


def package_model(model_dir: str | Path, output_dir: str | Path | None = None, *, calibration_images: int = 32,
                  router_train_samples: int = 1024, router_eval_samples: int = 128, reference_limit: int = 250,
                  tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Run the four steps of the module docstring; returns the content of ``calibration.json`` (trend, sink
    dimensions and scores, router metrics) plus ``reference`` (``reference_scores.json``)."""
    out = copy_model(model_dir, output_dir if output_dir is not None else assets_dir(SHIPPED_MODEL))
    logger.info(f"[1/4] calibrate-prune on {calibration_images} validation scenes")
    trend = calibrate_prune(out, calibration_images)
    logger.info("[2/4] calibrate-var")
    var = calibrate_var(out)
    logger.info(f"[3/4] DyVTE routers on {router_train_samples} Shapes VQA questions")
    dyvte = train_dyvte(out, router_train_samples, router_eval_samples, offset=calibration_images)
    logger.info(f"[4/4] reference accuracy on the first {reference_limit} test rows")
    reference = reference_scores(out, reference_limit, tolerance)
    calibration = {"source": Path(model_dir).name, "prune_trend": trend, "var": var, "dyvte": dyvte,
                   "calibration_images": calibration_images, "calibration_prompt": CALIBRATION_PROMPT}
    (out / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")
    (out / REFERENCE_FILE).write_text(json.dumps(reference, indent=2) + "\n")
    rewrite_card(out, calibration, reference)
    for path in out.iterdir():  # safetensors writes 0600; package data must be readable by every user
        path.chmod(0o644)
    return {**calibration, "reference": reference, "output_dir": str(out)}


def _summary(report: dict[str, Any]) -> str:
    var = report["var"]
    dyvte = report["dyvte"]
    massive = max(var["scores"]) / max(var["median_score"], 1e-12)
    lines = [
        f"packaged {report['source']} -> {report['output_dir']}",
        f"debiasing trend: b = {report['prune_trend']:.6g} (T(i) = exp(-b i), fitted on {report['calibration_images']}"
        " validation scenes)",
        f"VAR sink dims {var['sink_dims']}: first-token |x_d / RMS(x)| = "
        f"{', '.join(f'{s:.2f}' for s in var['scores'])} vs median {var['median_score']:.2f} over all dims "
        f"({massive:.1f}x; VAR's published sink dims stand tens of times above the rest)",
        "DyVTE routers: " + ", ".join(f"{k} {v:.4g}" for k, v in dyvte.items() if isinstance(v, float)),
        "reference (every patch off, first {limit} test rows): ".format(**report["reference"])
        + ", ".join(f"{k} {v:.4f}" for k, v in report["reference"]["accuracy"].items()),
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    report = package_model(args.model_dir, args.output_dir, calibration_images=args.calibration_images,
                           router_train_samples=args.router_train_samples,
                           router_eval_samples=args.router_eval_samples, reference_limit=args.reference_limit,
                           tolerance=args.tolerance)
    print(_summary(report))
    return 0


def add_subparser(subparsers: Any) -> None:
    """Register ``hf-kan vlm-package``."""
    from ..cli import DefaultsHelpFormatter

    parser = subparsers.add_parser(
        "vlm-package",
        help="calibrate a trained Shapes VQA model (debias trend, VAR sink dims, DyVTE routers) and ship it",
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("model_dir", help="a directory written by hf-kan vlm-train")
    parser.add_argument("--output-dir", default=None,
                        help=f"where the packaged model goes (default: the package's assets/{SHIPPED_MODEL})")
    parser.add_argument("--calibration-images", type=int, default=32, help="scenes for calibrate-prune")
    parser.add_argument("--router-train-samples", type=int, default=1024, help="DyVTE router training questions")
    parser.add_argument("--router-eval-samples", type=int, default=128,
                        help="DyVTE router validation and test questions (each)")
    parser.add_argument("--reference-limit", type=int, default=250, help="test rows of the reference figure")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="accuracy tolerance stored with the reference figure")
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads")
    parser.set_defaults(func=_run)


__all__ = ["add_subparser", "calibrate_prune", "calibrate_var", "copy_model", "package_model", "reference_scores",
           "train_dyvte"]
