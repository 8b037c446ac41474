"""Image-classification training for any registered backbone, under ``accelerate launch`` or plain Python.

Python::

    from hf_kan.train import ImageClassificationArguments, train_image_classification
    metrics = train_image_classification(ImageClassificationArguments(model="kat-tiny", image_size=32, patch_size=4))

Command line (one process, or several with accelerate)::

    hf-kan train --model kat-tiny --image-size 32 --patch-size 4 --epochs 10
    accelerate launch --multi_gpu --num_processes 2 -m hf_kan.train.image_classification --model kat-tiny ...

The model comes from a registered preset (``hf_kan.available_presets()``, built from its config with
``image_size`` / ``patch_size`` / ``num_channels`` / ``config_overrides`` applied, random weights), or from
a local directory / Hub id (``from_pretrained``; the classifier head is re-initialised when the label count
differs). The data is the embedded digits (default) or a Hugging Face ``datasets`` data set
(:mod:`hf_kan.train.data`).

Training: AdamW (weight decay on Linear/Conv weights only), linear warm-up then cosine decay, optional
gradient accumulation and clipping, mixed precision through accelerate. Accuracy is evaluated every
``eval_steps`` optimizer steps or at the end of every epoch, gathered over processes with duplicated
samples dropped; the best model is written with ``save_pretrained`` to ``output_dir`` (with its image
processor, ``metrics.json`` and ``training_args.json``) and optionally pushed to the Hub.

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N`` starts N processes but
accelerate would treat each as a lone single-process run; this module detects that (a distributed
launch with no CUDA/XPU device) and creates the ``Accelerator`` with ``cpu=True``, which makes the
processes one gloo (``MULTI_CPU``) group (:func:`hf_kan.train.runtime.make_accelerator`).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PretrainedConfig
from transformers.utils import logging

from ..errors import HFKanConfigError, UnsupportedModelError
from ..models.presets import available_presets, config_from_preset
from .cli_args import add_dataclass_arguments, dataclass_from_namespace
from .data import EMBEDDED_DATASET, ClassificationData, collate_classification, load_classification_data
from .runtime import is_rank_zero, make_accelerator, write_run_files

logger = logging.get_logger(__name__)


@dataclass
class ImageClassificationArguments:
    """Everything :func:`train_image_classification` needs; every field is also a CLI option (``--field-name``)."""

    model: str = field(
        default="kat-tiny",
        metadata={"help": "registered preset name (see `hf_kan.available_presets()`), local dir or Hub id"},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "datasets name/path or save_to_disk dir; unset or 'digits' = embedded sklearn digits"},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "datasets configuration name"})
    train_split: str = field(default="train", metadata={"help": "training split"})
    eval_split: str | None = field(
        default=None, metadata={"help": "eval split; unset = first of test/validation/valid/val, else held out"}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "share of train held out when there is no eval split"})
    image_column: str = field(default="image", metadata={"help": "column holding the images"})
    label_column: str = field(default="label", metadata={"help": "column holding the class labels"})
    image_processor: str | None = field(
        default=None,
        metadata={"help": "image processor dir/Hub id; unset = the model's own, else a default resize+norm"},
    )
    image_size: int | None = field(default=None, metadata={"help": "image size for presets (unset = preset default)"})
    patch_size: int | None = field(default=None, metadata={"help": "patch size for presets (unset = preset default)"})
    num_channels: int | None = field(
        default=None, metadata={"help": "input channels for presets (unset = preset default)"}
    )
    config_overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "extra config fields, e.g. hidden_size=96,num_hidden_layers=4"}
    )
    output_dir: str = field(default="outputs/image-classification", metadata={"help": "where the best model goes"})
    epochs: float = field(default=10.0, metadata={"help": "training epochs (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs when set"})
    batch_size: int = field(default=64, metadata={"help": "training batch size per process"})
    eval_batch_size: int = field(default=256, metadata={"help": "eval batch size per process"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (Linear/Conv weights only)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of optimizer steps spent warming up"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping norm (unset = none)"})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no/fp16/bf16; unset = whatever `accelerate launch`/config says"}
    )
    seed: int = field(default=0, metadata={"help": "seed for init, shuffling and the held-out split"})
    eval_steps: int | None = field(
        default=None, metadata={"help": "evaluate every N optimizer steps (unset = per epoch)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "train on a seeded subset of this size"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N eval rows"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads per process (unset = torch's default)"}
    )
    cpu: bool = field(default=False, metadata={"help": "force CPU even when a GPU is present"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm bar (main process only)"})
    save_model: bool = field(default=True, metadata={"help": "save the best model to output_dir"})
    push_to_hub: bool = field(default=False, metadata={"help": "push the best model to the Hub at the end"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (unset = output_dir's name)"})

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        positive["gradient_accumulation_steps"] = self.gradient_accumulation_steps
        for name, value in positive.items():
            if value < 1:
                raise HFKanConfigError(f"{name} must be >= 1, got {value}")
        if self.max_steps is None and self.epochs <= 0:
            raise HFKanConfigError(f"epochs must be > 0 (or set max_steps), got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise HFKanConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise HFKanConfigError(f"eval_steps must be >= 1, got {self.eval_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise HFKanConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise HFKanConfigError(f"mixed_precision must be one of no/fp16/bf16, got {self.mixed_precision!r}")


def resolve_config(args: ImageClassificationArguments) -> tuple[PretrainedConfig, bool]:
    """The model config with the requested sizes applied, and whether it came from a preset."""
    sizes = {
        k: v
        for k, v in (
            ("image_size", args.image_size),
            ("patch_size", args.patch_size),
            ("num_channels", args.num_channels),
        )
        if v is not None
    }
    if args.model in available_presets():
        return config_from_preset(args.model, **{**args.config_overrides, **sizes}), True
    if sizes:
        raise HFKanConfigError(
            f"image_size/patch_size/num_channels ({sizes}) apply to presets only; {args.model!r} is loaded with "
            "from_pretrained and keeps its own sizes (use its image processor, or a preset to train from scratch)"
        )
    try:
        config = AutoConfig.from_pretrained(args.model, **args.config_overrides)
    except OSError as err:
        raise HFKanConfigError(
            f"{args.model!r} is neither a registered preset ({', '.join(available_presets())}) nor a loadable "
            f"model directory / Hub id: {err}"
        ) from err
    return config, False


def _image_processor_for(args: ImageClassificationArguments, from_preset: bool) -> Any | None:
    """The explicitly requested image processor, else the one saved with a pretrained model, else None."""
    if args.image_processor is not None:
        return AutoImageProcessor.from_pretrained(args.image_processor)
    if from_preset:
        return None
    try:
        return AutoImageProcessor.from_pretrained(args.model)
    except (OSError, ValueError):
        return None


def build_model(
    args: ImageClassificationArguments, config: PretrainedConfig, from_preset: bool, label_names: list[str]
) -> torch.nn.Module:
    """An ``AutoModelForImageClassification`` for ``config`` with a head for ``label_names``."""
    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in id2label.items()}
    config.id2label, config.label2id = id2label, label2id
    if from_preset:
        try:
            return AutoModelForImageClassification.from_config(config)
        except ValueError as err:
            raise UnsupportedModelError(
                f"preset {args.model!r} (model_type {config.model_type!r}) has no image-classification model "
                f"registered with AutoModelForImageClassification: {err}"
            ) from err
    # a different label count re-initialises the classifier head (reported by Transformers)
    return AutoModelForImageClassification.from_pretrained(args.model, config=config, ignore_mismatched_sizes=True)


def make_optimizer(model: torch.nn.Module, args: ImageClassificationArguments) -> torch.optim.AdamW:
    """AdamW with weight decay on the weights of Linear and Conv layers only.

    Biases, norms, embeddings, class/position tokens and activation coefficients (e.g. GR-KAN rationals)
    are not decayed: pulling them towards zero changes the function rather than regularising it.
    """
    decayed_types = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, decayed_types)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in decay_ids], "weight_decay": args.weight_decay},
        {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, args.adam_beta2))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the whole eval set, gathered across processes.

    ``gather_for_metrics`` drops the samples the distributed sampler duplicated to even out the last batch,
    so every eval row counts exactly once.
    """
    model.eval()
    correct = torch.zeros((), dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        preds, labels, losses = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], losses))
        correct += (preds == labels).sum().cpu().double()
        loss_sum += losses.sum().cpu().double()
        count += labels.numel()
    model.train()
    return {"eval_accuracy": (correct / count).item(), "eval_loss": (loss_sum / count).item(), "eval_samples": count}


def _record_card_info(model: Any, args: ImageClassificationArguments, metrics: dict[str, Any]) -> None:
    """Put the training data and measured accuracy into ``config.model_card_info`` (rendered by ``hf_kan.hub``)."""
    from ..hub import set_model_card_info

    embedded = args.dataset in (None, EMBEDDED_DATASET)
    dataset = "scikit-learn digits (embedded in hf_kan.data)" if embedded else args.dataset
    hub_dataset = not embedded and not os.path.exists(args.dataset)  # only Hub ids belong in the card's datasets
    is_hub_id = not os.path.isdir(args.model) and args.model not in available_presets()
    set_model_card_info(
        model,
        datasets=[args.dataset] if hub_dataset else None,
        metrics={"accuracy": round(metrics["eval_accuracy"], 4)},
        metrics_dataset=f"{dataset}, {metrics['eval_samples']} eval images",
        metrics_source="measured with hf-kan train",
        base_model=args.model if is_hub_id else None,
        training=f"Trained with `hf-kan train` from {args.model!r} for {metrics['step']} optimizer steps.",
    )


def _save(model: Any, data: ClassificationData, accelerator: Any, output_dir: str) -> None:
    """``save_pretrained`` the unwrapped model (and image processor) on the main process."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process and data.image_processor is not None:
        data.image_processor.save_pretrained(output_dir)


def train_image_classification(args: ImageClassificationArguments) -> dict[str, Any]:
    """Train, evaluate and save; return the final metrics (identical on every process).

    Returned keys: ``eval_accuracy`` / ``eval_loss`` (last evaluation), ``best_eval_accuracy``, ``best_step``,
    ``train_loss`` (mean over the last epoch's micro-batches, averaged over processes), ``steps``, ``epochs``,
    ``step_time_median_s`` (forward + backward + optimizer step, median over optimizer steps of this process),
    ``train_runtime_s``, ``num_parameters``, ``num_processes``, ``history`` (every evaluation), ``output_dir``.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    accelerator = make_accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    set_seed(args.seed)
    config, from_preset = resolve_config(args)
    image_size = getattr(config, "image_size", None)
    num_channels = getattr(config, "num_channels", 3)
    if image_size is None:
        raise UnsupportedModelError(f"config of {args.model!r} has no image_size; it is not an image model")
    with accelerator.main_process_first():
        data = load_classification_data(
            args.dataset,
            image_size=image_size if isinstance(image_size, int) else image_size[0],
            num_channels=num_channels,
            dataset_config=args.dataset_config,
            train_split=args.train_split,
            eval_split=args.eval_split,
            eval_fraction=args.eval_fraction,
            image_column=args.image_column,
            label_column=args.label_column,
            image_processor=_image_processor_for(args, from_preset),
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
            seed=args.seed,
        )
    model = build_model(args, config, from_preset, data.label_names)
    num_parameters = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, args)

    generator = torch.Generator().manual_seed(args.seed)
    loader_kwargs = {"collate_fn": collate_classification, "num_workers": args.num_workers}
    train_loader = torch.utils.data.DataLoader(
        data.train, batch_size=args.batch_size, shuffle=True, generator=generator, **loader_kwargs
    )
    eval_loader = torch.utils.data.DataLoader(data.eval, batch_size=args.eval_batch_size, **loader_kwargs)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    steps_per_epoch = max(1, math.ceil(len(train_loader) / args.gradient_accumulation_steps))
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # Stepped by hand once per optimizer step of this process, so not passed to accelerator.prepare
    # (a prepared scheduler steps num_processes times per call).
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_ratio * total_steps), total_steps)

    if accelerator.is_main_process:
        write_run_files(args.output_dir, args=args)
        logger.info(
            f"training {args.model} ({num_parameters:,} parameters) on {len(data.train)} images / "
            f"{len(data.label_names)} classes, {total_steps} steps, {accelerator.num_processes} process(es)"
        )

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"eval_accuracy": -1.0, "step": 0}
    step_times: list[float] = []
    step, pending_time = 0, 0.0
    epoch_loss, epoch_batches = torch.zeros((), device=accelerator.device), 0
    progress = tqdm(
        total=total_steps, desc=f"train {args.model}", disable=not (args.progress_bar and accelerator.is_main_process)
    )
    start = time.perf_counter()

    def run_eval() -> dict[str, float]:
        metrics = evaluate(model, eval_loader, accelerator) | {"step": step}
        history.append(metrics)
        if metrics["eval_accuracy"] > best["eval_accuracy"]:
            best.update(eval_accuracy=metrics["eval_accuracy"], step=step)
            if args.save_model:
                _record_card_info(accelerator.unwrap_model(model), args, metrics)
                _save(model, data, accelerator, args.output_dir)
        return metrics

    model.train()
    last = {}
    for _epoch in range(num_epochs):
        epoch_loss.zero_()
        epoch_batches = 0
        for batch in train_loader:
            t0 = time.perf_counter()
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                if outputs.loss is None:
                    raise UnsupportedModelError(f"{type(model).__name__} returned no loss for the given labels")
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            epoch_loss += outputs.loss.detach().float()
            epoch_batches += 1
            pending_time += time.perf_counter() - t0
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            step_times.append(pending_time)
            pending_time = 0.0
            progress.update(1)
            eval_acc = f"{history[-1]['eval_accuracy']:.4f}" if history else "-"
            progress.set_postfix(
                loss=f"{outputs.loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", eval_acc=eval_acc
            )
            if args.eval_steps and step % args.eval_steps == 0:
                last = run_eval()
            if step >= total_steps:
                break
        if not args.eval_steps and step < total_steps:
            last = run_eval()
    if not history or history[-1]["step"] != step:
        last = run_eval()
    progress.close()
    runtime = time.perf_counter() - start
    train_loss = accelerator.reduce(epoch_loss / max(epoch_batches, 1), reduction="mean").item()

    metrics: dict[str, Any] = {
        "eval_accuracy": last["eval_accuracy"],
        "eval_loss": last["eval_loss"],
        "best_eval_accuracy": best["eval_accuracy"],
        "best_step": best["step"],
        "train_loss": train_loss,
        "steps": step,
        "epochs": step / steps_per_epoch,
        "step_time_median_s": statistics.median(step_times),
        "train_runtime_s": runtime,
        "num_parameters": num_parameters,
        "num_processes": accelerator.num_processes,
        "history": history,
        "output_dir": args.output_dir,
    }
    if accelerator.is_main_process:
        write_run_files(args.output_dir, metrics=metrics)
        logger.info(f"best eval accuracy {best['eval_accuracy']:.4f} at step {best['step']}")
    if args.push_to_hub and args.save_model:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            push_to_hub(args, data)
    accelerator.wait_for_everyone()
    return metrics


def push_to_hub(args: ImageClassificationArguments, data: ClassificationData) -> str:
    """Upload the best saved model (and image processor) from ``output_dir``; returns the repo id."""
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    model = AutoModelForImageClassification.from_pretrained(args.output_dir)
    model.push_to_hub(repo_id, commit_message=f"hf-kan train: {args.model}")
    if data.image_processor is not None:
        data.image_processor.push_to_hub(repo_id)
    return repo_id


def _summary(metrics: dict[str, Any]) -> str:
    keys = ("best_eval_accuracy", "eval_accuracy", "train_loss", "steps", "step_time_median_s", "train_runtime_s")
    return "\n".join(
        f"{k:>20}: {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k:>20}: {metrics[k]}" for k in keys
    )


def _run_from_namespace(namespace: argparse.Namespace) -> int:
    args = dataclass_from_namespace(ImageClassificationArguments, namespace)
    metrics = train_image_classification(args)
    if is_rank_zero():
        print(_summary(metrics))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every :class:`ImageClassificationArguments` field as an option."""
    add_dataclass_arguments(parser, ImageClassificationArguments)


def add_subparser(subparsers: Any) -> None:
    """Register ``hf-kan train``."""
    parser = subparsers.add_parser(
        "train",
        help="train an image classifier (any registered backbone) on a datasets data set or the embedded digits",
        description=__doc__.split("\n\n")[0] + " Run under `accelerate launch -m hf_kan.train.image_classification` "
        "for several processes.",
    )
    add_arguments(parser)
    parser.set_defaults(func=_run_from_namespace)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m hf_kan.train.image_classification`` / ``accelerate launch -m ...``."""
    parser = argparse.ArgumentParser(prog="hf_kan.train.image_classification", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return _run_from_namespace(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
