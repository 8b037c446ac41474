"""``hf-kan vlm-train``: train the Shapes VQA vision-language model (LLaVA with a KAT or ViT tower) from scratch.

Command line (one process, or several with accelerate; ``--batch-size`` is per process)::

    hf-kan vlm-train --output-dir outputs/shapes-vlm-kat                       # the shipped model's recipe
    hf-kan vlm-train --tower vit --output-dir outputs/shapes-vlm-vit           # the same-size ViT-tower twin
    hf-kan vlm-train --mma --output-dir outputs/shapes-vlm-kat-mma             # MMA on during training
    accelerate launch --multi_gpu --num_processes 2 -m hf_kan.vlm.train --output-dir ...

Recipe (the defaults): the data set of :mod:`hf_kan.data.shapes_vqa` (train split plus the auxiliary ``describe``
questions, which teach the language model to address image tokens by position); an object-count curriculum (scenes
with at most 1, then 2, 3, ... objects, ``--curriculum``); AdamW with weight decay on matrices only, the projector
at ``--projector-lr-scale`` times the learning rate, linear warm-up then cosine decay; loss = cross-entropy of the
answer and ``</s>``. Validation accuracy per question type is measured every ``--eval-steps``; the model with the
best mean validation accuracy over the question types (``--question-types``, default all five) is kept, scored once
on the test split at the end, and written to ``output_dir`` with its processor, ``metrics.json``,
``training_args.json`` and a model card.

Patches stay off during training except MMA (``--mma``: ``hf_kan.patches.apply(model, mma=True,
processor=...)`` before training, saved in the model's config). Parameters the loss never reaches (the tower's
final LayerNorm, which LLaVA's ``vision_feature_layer=-1`` bypasses, and CLIP's pooler LayerNorm) are frozen after
one probing backward pass, so several processes need no ``find_unused_parameters``. Without GPUs, several
processes form one gloo group (:func:`hf_kan.train.runtime.make_accelerator`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from transformers.utils import logging

from ..data.shapes_vqa import CHANCE_LEVELS, QUESTION_TYPES, ShapesVQAConfig, load_shapes_vqa
from ..errors import HFKanConfigError
from ..train.cli_args import add_dataclass_arguments, dataclass_from_namespace
from ..train.runtime import is_rank_zero, make_accelerator, write_run_files
from .arguments import VLMTrainingArguments
from .batches import CurriculumSampler, VQACollator, parse_curriculum
from .modeling import build_vlm
from .processing import build_processor
from .scoring import score_batch, summarize

logger = logging.get_logger(__name__)

def make_optimizer(model: torch.nn.Module, args: VLMTrainingArguments) -> torch.optim.AdamW:
    """AdamW over four groups: {projector, rest} x {matrices (decayed), vectors/embeddings/rationals (not)}.

    The projector runs at ``projector_lr_scale * learning_rate``; embeddings, norms, biases, tokens and rational
    coefficients are not decayed.
    """
    decayed = (torch.nn.Linear, torch.nn.Conv2d)
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, decayed)}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(("multi_modal_projector" in name, id(param) in decay_ids), []).append(param)
    return torch.optim.AdamW(
        [
            {"params": params, "weight_decay": args.weight_decay if decay else 0.0,
             "lr": args.learning_rate * (args.projector_lr_scale if projector else 1.0)}
            for (projector, decay), params in groups.items()
        ],
        lr=args.learning_rate,
    )


def freeze_unreached_parameters(model: torch.nn.Module, batch: dict[str, Any]) -> list[str]:
    """Run one forward/backward on ``batch`` and freeze (``requires_grad=False``) every parameter that got no
    gradient; returns their names. Gradients are cleared afterwards."""
    model(**batch).loss.backward()
    frozen = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, param in model.named_parameters():
        param.grad = None
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, loader: Any, accelerator: Any, eos_token_id: int,
                   question_types: Sequence[str], main_types: Sequence[str] = QUESTION_TYPES) -> dict[str, Any]:
    """Answer accuracy per question type and mean answer loss on ``loader`` (every row once, over processes);
    ``question_types`` maps the batches' ``type_ids`` to names, ``main_types`` enter the mean accuracy."""
    was_training = model.training
    model.eval()
    correct, losses, kinds = [], [], []
    for batch in loader:
        type_ids = batch.pop("type_ids")
        ok, loss = score_batch(model, batch, eos_token_id)
        ok, loss, type_ids = accelerator.gather_for_metrics((ok, loss, type_ids))
        correct += ok.tolist()
        losses += loss.tolist()
        kinds += [question_types[i] for i in type_ids.tolist()]
    model.train(was_training)
    return summarize(correct, kinds, losses, main_types=main_types)


class _TypedCollator(VQACollator):
    """:class:`VQACollator` that adds ``type_ids`` (index of each row's question type) as a tensor to gather."""

    def __init__(self, processor: Any, question_types: Sequence[str]):
        super().__init__(processor)
        self.question_types = list(question_types)

    def __call__(self, rows):
        batch = super().__call__(rows)
        batch["type_ids"] = torch.tensor([self.question_types.index(r["question_type"]) for r in rows])
        return batch


def _log_evaluation(output_dir: str, entry: dict[str, Any]) -> None:
    """Print one validation line (through tqdm, so the bar stays intact) and append ``entry`` to
    ``output_dir/history.jsonl`` (to follow a long run)."""
    from tqdm.auto import tqdm

    accuracy = ", ".join(f"{k} {v:.3f}" for k, v in entry["validation"]["accuracy"].items())
    train_loss = "-" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
    tqdm.write(f"step {entry['step']}: train loss {train_loss}, validation loss "
               f"{entry['validation']['loss']:.4f}, accuracy {accuracy}")
    with open(os.path.join(output_dir, "history.jsonl"), "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def load_weights(model: Any, directory: str) -> None:
    """Copy the weights of a model saved by this trainer into ``model`` (built with the same tower and sizes)."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise HFKanConfigError(f"--init-from {directory!r} has no config.json; pass a directory that hf-kan "
                               "vlm-train saved")
    saved = type(model).from_pretrained(directory).state_dict()
    own = model.state_dict()
    mismatched = sorted(k for k, v in saved.items() if k in own and own[k].shape != v.shape)
    if mismatched or set(own) != set(saved):
        raise HFKanConfigError(
            f"--init-from {directory!r} does not fit the model these options build (mismatched shapes: "
            f"{mismatched[:3]}, missing: {sorted(set(own) - set(saved))[:3]}); pass the same --tower and size "
            "options the saved model was trained with"
        )
    model.load_state_dict(saved)


def train_vlm(args: VLMTrainingArguments) -> dict[str, Any]:
    """Train, select on validation, score the selected model on test and save; returns the metrics (the content of
    ``metrics.json``: ``test``, ``best_validation``, ``best_step``, ``history``, ``train_runtime_s``, ...)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    accelerator = make_accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    processor = build_processor(args.image_size, args.patch_size)
    train_types = args.types + (("describe",) if args.describe else ())
    with accelerator.main_process_first():
        data = load_shapes_vqa(args.train_size, args.validation_size, args.test_size, seed=args.data_seed,
                               question_types=args.types, train_question_types=train_types,
                               config=ShapesVQAConfig(image_size=args.image_size))
    model = build_vlm(args.tower, args.shape, processor.tokenizer)
    if args.init_from is not None:
        load_weights(model, args.init_from)
    if args.mma:
        from .. import patches

        patches.apply(model, mma=True, processor=processor)
    num_parameters = sum(p.numel() for p in model.parameters())

    collate = VQACollator(processor)
    stages = parse_curriculum(args.curriculum, args.max_steps)
    sampler = CurriculumSampler([len(o) for o in data["train"]["objects"]], stages, args.seed,
                                accelerator.process_index, accelerator.num_processes)
    train = data["train"]
    frozen = freeze_unreached_parameters(model, collate([train[i] for i in sampler.draw(0, 2)]))
    vision_losses = []
    if args.vision_pretrain_steps:
        from .vision_pretraining import pretrain_vision

        rng = torch.Generator().manual_seed(args.seed)
        vision_losses = pretrain_vision(
            model, lambda _: [train[int(i)] for i in torch.randint(len(train), (args.batch_size,), generator=rng)],
            processor.image_processor, args.vision_pretrain_steps, args.batch_size, args.learning_rate,
        )
    optimizer = make_optimizer(model, args)
    eval_collate = _TypedCollator(processor, train_types)
    loader_kwargs = {"batch_size": args.eval_batch_size, "collate_fn": eval_collate}
    val_loader = torch.utils.data.DataLoader(data["validation"], **loader_kwargs)
    test_loader = torch.utils.data.DataLoader(data["test"], **loader_kwargs)
    model, optimizer, val_loader, test_loader = accelerator.prepare(model, optimizer, val_loader, test_loader)
    # stepped by hand once per optimizer step (a prepared scheduler would step once per process)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    eos = processor.tokenizer.eos_token_id

    if accelerator.is_main_process:
        write_run_files(args.output_dir, args=args)
        open(os.path.join(args.output_dir, "history.jsonl"), "w").close()
        logger.info(f"training a {args.tower}-tower LLaVA ({num_parameters:,} parameters; frozen, unreached by the "
                    f"loss: {frozen}) for {args.max_steps} steps on {accelerator.num_processes} process(es)")
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": (-1.0, 0.0), "step": 0, "state": None}
    progress = tqdm(total=args.max_steps, desc=f"vlm-train {args.tower}{' +mma' if args.mma else ''}",
                    disable=not (args.progress_bar and accelerator.is_main_process))
    start = time.perf_counter()
    running: list[float] = []

    def run_evaluation(step: int) -> dict[str, Any]:
        result = evaluate_split(model, val_loader, accelerator, eos, train_types, args.types)
        entry = {"step": step, "train_loss": sum(running) / len(running) if running else None,
                 "max_objects": sampler.max_objects(max(step - 1, 0)), "elapsed_s": time.perf_counter() - start,
                 "validation": result}
        running.clear()
        history.append(entry)
        score = (result["accuracy"]["mean"], -result["loss"])
        if score > best["score"]:
            best.update(score=score, step=step, state=copy.deepcopy(accelerator.unwrap_model(model).state_dict()))
        if accelerator.is_main_process:
            _log_evaluation(args.output_dir, entry)
        return result

    run_evaluation(0)
    model.train()
    for step in range(1, args.max_steps + 1):
        batch = _to_device(collate([train[i] for i in sampler.draw(step - 1, args.batch_size)]), accelerator.device)
        loss = model(**batch).loss
        accelerator.backward(loss)
        if args.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.detach().float().item())
        progress.update(1)
        if step % args.eval_steps == 0 or step == args.max_steps:
            result = run_evaluation(step)
            progress.set_postfix(val_loss=f"{result['loss']:.3f}", val_acc=f"{result['accuracy']['mean']:.3f}")
    progress.close()
    runtime = time.perf_counter() - start

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(best["state"])
    test = evaluate_split(model, test_loader, accelerator, eos, train_types, args.types)
    metrics: dict[str, Any] = {
        "tower": args.tower,
        "mma": args.mma,
        "test": test,
        "chance": dict(CHANCE_LEVELS),
        "best_step": best["step"],
        "best_validation": next(h["validation"] for h in history if h["step"] == best["step"]),
        "steps": args.max_steps,
        "train_runtime_s": runtime,
        "num_parameters": num_parameters,
        "num_processes": accelerator.num_processes,
        "frozen_parameters": frozen,
        "vision_pretrain_loss": vision_losses[-1:] and vision_losses[-1],
        "history": history,
    }
    if accelerator.is_main_process:
        write_run_files(args.output_dir, metrics=metrics)
        if args.save_model:
            save_vlm(unwrapped, processor, args, metrics)
        logger.info("test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in test["accuracy"].items()))
    accelerator.wait_for_everyone()
    return metrics


def save_vlm(model: Any, processor: Any, args: VLMTrainingArguments, metrics: dict[str, Any]) -> None:
    """Write the model (safetensors), its processor and the model card to ``args.output_dir``."""
    from .card import write_vlm_card

    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    write_vlm_card(args.output_dir, model, asdict(args), metrics)


def _summary(metrics: dict[str, Any]) -> str:
    rows = [f"{'question type':>14}  {'test acc':>8}  {'chance':>6}"]
    for kind, acc in metrics["test"]["accuracy"].items():
        chance = metrics["chance"].get(kind)
        rows.append(f"{kind:>14}  {acc:8.4f}  {'' if chance is None else f'{chance:6.3f}'}")
    rows.append(f"best step {metrics['best_step']} of {metrics['steps']}, {metrics['train_runtime_s']:.0f} s")
    return "\n".join(rows)


def _run_from_namespace(namespace: argparse.Namespace) -> int:
    metrics = train_vlm(dataclass_from_namespace(VLMTrainingArguments, namespace))
    if is_rank_zero():
        print(_summary(metrics))
    return 0


def add_subparser(subparsers: Any) -> None:
    """Register ``hf-kan vlm-train``."""
    parser = subparsers.add_parser(
        "vlm-train",
        help="train the Shapes VQA vision-language model (LLaVA with a KAT or ViT tower) from scratch",
        description=__doc__.split("\n\n")[0] + " Run under `accelerate launch -m hf_kan.vlm.train` for several "
        "processes.",
    )
    add_dataclass_arguments(parser, VLMTrainingArguments)
    parser.set_defaults(func=_run_from_namespace)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m hf_kan.vlm.train`` / ``accelerate launch -m hf_kan.vlm.train``."""
    parser = argparse.ArgumentParser(prog="hf_kan.vlm.train", description=__doc__.split("\n\n")[0])
    add_dataclass_arguments(parser, VLMTrainingArguments)
    return _run_from_namespace(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
