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
gradient accumulation and clipping, mixed precision through accelerate. **Model selection** follows
:mod:`hf_kan.train.splits`: accuracy on the validation split (carved from train when the data set has none) is
measured every ``eval_steps`` optimizer steps or at the end of every epoch, gathered over processes with duplicated
samples dropped; the best evaluation's parameters are kept (:class:`hf_kan.train.selection.ModelSelector`,
optional early stopping). After training the selected model is evaluated **once** on the test split; that test
accuracy is what is returned, written to ``metrics.json`` and to the model card. The selected model is saved with
``save_pretrained`` to ``output_dir`` with its image processor (so ``pipeline("image-classification",
model=output_dir)`` works), ``metrics.json`` and ``training_args.json``, and optionally pushed to the Hub (access is
checked before training starts).

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N`` starts N processes but
accelerate would treat each as a lone single-process run; this module detects that (a distributed
launch with no CUDA/XPU device) and creates the ``Accelerator`` with ``cpu=True``, which makes the
processes one gloo (``MULTI_CPU``) group (:func:`hf_kan.train.runtime.make_accelerator`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import HFKanConfigError, UnsupportedModelError
from .cli_args import add_dataclass_arguments, dataclass_from_namespace
from .runtime import check_hub_push, finish, is_rank_zero, make_accelerator, write_run_files
from .splits import DEFAULT_SPLIT_SEED, DEFAULT_VALIDATION_FRACTION

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .data import ClassificationData

# Transformers, datasets and the model code are imported where they are used, so that ``hf-kan train --help``
# loads none of them. (A logger of Transformers' ``logging.get_logger`` is this same stdlib logger.)
logger = logging.getLogger(__name__)


@dataclass
class ImageClassificationArguments:
    """Everything :func:`train_image_classification` needs; every field is also a CLI option (``--field-name``)."""

    model: str = field(
        default="kat-tiny",
        metadata={"help": "registered preset name (listed by hf_kan.available_presets()), local dir or Hub id"},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "datasets name/path or save_to_disk dir; unset or 'digits' = embedded sklearn digits"},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "datasets configuration name"})
    train_split: str = field(default="train", metadata={"help": "training split"})
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "split the model is selected on; unset = the first of validation/valid/val/dev, else "
            "--validation-fraction of the train split is held out"
        },
    )
    validation_fraction: float = field(
        default=DEFAULT_VALIDATION_FRACTION,
        metadata={"help": "share of the train split held out for validation when the data set has no validation split"},
    )
    test_split: str | None = field(
        default=None,
        metadata={"help": "split evaluated once, on the selected model, after training; unset = 'test' if present"},
    )
    split_seed: int = field(
        default=DEFAULT_SPLIT_SEED,
        metadata={"help": "seed of the held-out splits (the embedded digits' fixed split, a carved validation split)"},
    )
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
    output_dir: str = field(
        default="outputs/image-classification", metadata={"help": "where the selected model and metrics go"}
    )
    epochs: float = field(default=10.0, metadata={"help": "training epochs (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs when set"})
    batch_size: int = field(default=64, metadata={"help": "training batch size per process"})
    eval_batch_size: int = field(default=256, metadata={"help": "eval batch size per process"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (Linear/Conv weights only)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of optimizer steps spent warming up"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "clip the global gradient norm to this value; 0 turns clipping off"}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no/fp16/bf16; unset = what accelerate launch or its config says"}
    )
    seed: int = field(default=0, metadata={"help": "seed for initialisation, shuffling and --max-train-samples"})
    eval_steps: int | None = field(
        default=None, metadata={"help": "evaluate on the validation split every N optimizer steps (unset = per epoch)"}
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "stop after N validation evaluations in a row without improvement (unset = never)"},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "train on a seeded subset of this size"})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "use only the first N rows of the validation and test splits"}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads per process (unset = torch's default)"}
    )
    cpu: bool = field(default=False, metadata={"help": "force CPU even when a GPU is present"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm bar (main process only)"})
    save_model: bool = field(default=True, metadata={"help": "save the selected model to output_dir"})
    push_to_hub: bool = field(
        default=False, metadata={"help": "push the selected model to the Hub at the end (access checked first)"}
    )
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
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise HFKanConfigError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.max_grad_norm == 0:
            self.max_grad_norm = None
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise HFKanConfigError(f"early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise HFKanConfigError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


def resolve_config(args: ImageClassificationArguments) -> tuple[PretrainedConfig, bool]:
    """The model config with the requested sizes applied, and whether it came from a preset."""
    from transformers import AutoConfig

    from ..models.presets import available_presets, config_from_preset

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
    from transformers import AutoImageProcessor

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
    from transformers import AutoModelForImageClassification

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
def evaluate(model: torch.nn.Module, loader: Any, accelerator: Any, split: str = "validation") -> dict[str, float]:
    """``{split}_accuracy``, ``{split}_loss`` (mean cross-entropy) and ``{split}_samples`` over the whole split,
    gathered across processes.

    ``gather_for_metrics`` drops the samples the distributed sampler duplicated to even out the last batch,
    so every row counts exactly once.
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
    return {
        f"{split}_accuracy": (correct / count).item(),
        f"{split}_loss": (loss_sum / count).item(),
        f"{split}_samples": count,
    }


def _record_card_info(model: Any, args: ImageClassificationArguments, metrics: dict[str, Any]) -> None:
    """Put the training data and the measured accuracy into ``config.model_card_info`` (rendered by ``hf_kan.hub``):
    the test accuracy of the selected model, or its validation accuracy (labelled so) when there is no test split."""
    from ..hub import set_model_card_info
    from ..models.presets import available_presets
    from .data import EMBEDDED_DATASET

    embedded = args.dataset in (None, EMBEDDED_DATASET)
    dataset = "scikit-learn digits (embedded in hf_kan.data)" if embedded else args.dataset
    hub_dataset = not embedded and not os.path.exists(args.dataset)
    is_hub_id = not os.path.isdir(args.model) and args.model not in available_presets()
    selection = (
        f"the checkpoint with the best validation accuracy ({metrics['validation_accuracy']:.4f} at step "
        f"{metrics['best_step']}; validation = {metrics['validation_source']}) was kept"
    )
    if metrics.get("test_accuracy") is not None:
        card_metrics = {"accuracy": round(metrics["test_accuracy"], 4)}
        measured_on = f"{dataset}, {metrics['test_source']}, {metrics['test_samples']} images"
        source = "measured once on the selected model with hf-kan train"
    else:
        card_metrics = {"validation_accuracy": round(metrics["validation_accuracy"], 4)}
        measured_on = f"{dataset}, validation ({metrics['validation_source']}), {metrics['validation_samples']} images"
        source = "hf-kan train; no test split: the selection split, so an optimistic estimate"
    set_model_card_info(
        model,
        datasets=[args.dataset] if hub_dataset else None,
        metrics=card_metrics,
        metrics_dataset=measured_on,
        metrics_source=source,
        base_model=args.model if is_hub_id else None,
        training=f"Trained with `hf-kan train` from {args.model!r} for {metrics['steps']} optimizer steps; "
        f"{selection}.",
    )


def _save(model: Any, data: ClassificationData, accelerator: Any, output_dir: str) -> None:
    """``save_pretrained`` the unwrapped model (and its image processor) on the main process."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process and data.image_processor is not None:
        data.image_processor.save_pretrained(output_dir)
    elif accelerator.is_main_process:
        logger.warning(
            "no image processor is known for this data set (pre-computed pixel_values); %s has none, so "
            "pipeline()/AutoImageProcessor cannot load it. Pass --image-processor to save one.",
            output_dir,
        )


def train_image_classification(args: ImageClassificationArguments) -> dict[str, Any]:
    """Train, select on validation, test once, save; return the final metrics (identical on every process).

    Returned keys: ``test_accuracy`` / ``test_loss`` / ``test_samples`` (the selected model on the test split, once
    after training; ``None`` without a test split), ``validation_accuracy`` / ``validation_loss`` /
    ``validation_samples`` (the selected model), ``best_step``, ``stopped_early``, ``selection``,
    ``validation_source`` / ``test_source``, ``train_loss`` (mean over the last epoch's micro-batches, averaged over
    processes), ``steps``, ``epochs``, ``step_time_median_s`` (forward + backward + optimizer step, median over
    optimizer steps of this process), ``train_runtime_s``, ``num_parameters``, ``num_processes``, ``history``
    (every validation evaluation), ``output_dir``.
    """

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    if args.push_to_hub:
        if not args.save_model:
            raise HFKanConfigError("--push-to-hub uploads the saved model; it cannot be combined with --no-save-model")
        check_hub_push(repo_id)
    accelerator = make_accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    try:
        metrics = _run(args, accelerator, repo_id)
    except BaseException:
        finish(accelerator, wait=False)
        raise
    finish(accelerator)
    return metrics


def _run(args: ImageClassificationArguments, accelerator: Any, repo_id: str) -> dict[str, Any]:
    """The body of :func:`train_image_classification` once the accelerator exists."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from .data import collate_classification, load_classification_data
    from .selection import ModelSelector

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
            validation_split=args.validation_split,
            test_split=args.test_split,
            validation_fraction=args.validation_fraction,
            image_column=args.image_column,
            label_column=args.label_column,
            image_processor=_image_processor_for(args, from_preset),
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
            seed=args.seed,
            split_seed=args.split_seed,
        )
    model = build_model(args, config, from_preset, data.label_names)
    num_parameters = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, args)

    generator = torch.Generator().manual_seed(args.seed)
    loader_kwargs = {"collate_fn": collate_classification, "num_workers": args.num_workers}
    train_loader = torch.utils.data.DataLoader(
        data.train, batch_size=args.batch_size, shuffle=True, generator=generator, **loader_kwargs
    )
    validation_loader = torch.utils.data.DataLoader(data.validation, batch_size=args.eval_batch_size, **loader_kwargs)
    model, optimizer, train_loader, validation_loader = accelerator.prepare(
        model, optimizer, train_loader, validation_loader
    )
    unwrapped = accelerator.unwrap_model(model)

    steps_per_epoch = max(1, math.ceil(len(train_loader) / args.gradient_accumulation_steps))
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # Stepped by hand once per optimizer step of this process, so not passed to accelerator.prepare
    # (a prepared scheduler steps num_processes times per call).
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_ratio * total_steps), total_steps)

    if accelerator.is_main_process:
        write_run_files(args.output_dir, args=args)
        test = f"{len(data.test)} test ({data.test_source})" if data.test is not None else "no test split"
        logger.info(
            f"training {args.model} ({num_parameters:,} parameters, {len(data.label_names)} classes) for "
            f"{total_steps} steps on {accelerator.num_processes} process(es); {len(data.train)} train, "
            f"{len(data.validation)} validation ({data.validation_source}), {test}"
        )

    selector = ModelSelector("validation_accuracy", "max", patience=args.early_stopping_patience)
    history: list[dict[str, Any]] = []
    step_times: list[float] = []
    step, pending_time = 0, 0.0
    epoch_loss, epoch_batches = torch.zeros((), device=accelerator.device), 0
    progress = tqdm(
        total=total_steps, desc=f"train {args.model}", disable=not (args.progress_bar and accelerator.is_main_process)
    )
    start = time.perf_counter()

    def validate() -> None:
        metrics = evaluate(model, validation_loader, accelerator, "validation") | {"step": step}
        history.append(metrics)
        selector.update(unwrapped, metrics, step)

    model.train()
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
            val_acc = f"{history[-1]['validation_accuracy']:.4f}" if history else "-"
            progress.set_postfix(
                loss=f"{outputs.loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", val_acc=val_acc
            )
            if args.eval_steps and step % args.eval_steps == 0:
                validate()
            if step >= total_steps or selector.should_stop:
                break
        if selector.should_stop:
            break
        if not args.eval_steps and step < total_steps:
            validate()
    if not history or history[-1]["step"] != step:
        validate()
    progress.close()
    runtime = time.perf_counter() - start
    train_loss = accelerator.reduce(epoch_loss / max(epoch_batches, 1), reduction="mean").item()

    # the selected model; the test split is seen here for the first and only time
    selector.restore(unwrapped)
    test_metrics = {"test_accuracy": None, "test_loss": None, "test_samples": 0}
    if data.test is not None:
        test_loader = accelerator.prepare(
            torch.utils.data.DataLoader(data.test, batch_size=args.eval_batch_size, **loader_kwargs)
        )
        test_metrics = evaluate(model, test_loader, accelerator, "test")
    best = selector.best_metrics
    metrics: dict[str, Any] = {
        **test_metrics,
        "validation_accuracy": best["validation_accuracy"],
        "validation_loss": best["validation_loss"],
        "validation_samples": best["validation_samples"],
        "best_step": selector.best_step,
        "stopped_early": selector.should_stop,
        "selection": selector.summary(),
        "validation_source": data.validation_source,
        "test_source": data.test_source,
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
    if args.save_model:
        _record_card_info(unwrapped, args, metrics)
        _save(model, data, accelerator, args.output_dir)
    if accelerator.is_main_process:
        write_run_files(args.output_dir, metrics=metrics)
        test_text = f"test accuracy {metrics['test_accuracy']:.4f}" if data.test is not None else "no test split"
        logger.info(
            f"selected step {selector.best_step} (validation accuracy {best['validation_accuracy']:.4f}); {test_text}"
        )
    if args.push_to_hub:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            push_to_hub(args, data, repo_id)
    return metrics


def push_to_hub(args: ImageClassificationArguments, data: ClassificationData, repo_id: str) -> str:
    """Upload the saved model (and image processor) from ``output_dir`` to ``repo_id``; returns the repo id."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(args.output_dir)
    model.push_to_hub(repo_id, commit_message=f"hf-kan train: {args.model}")
    if data.image_processor is not None:
        data.image_processor.push_to_hub(repo_id)
    return repo_id


def summary(metrics: dict[str, Any]) -> str:
    """The lines ``hf-kan train`` prints at the end."""
    keys = (
        "test_accuracy", "validation_accuracy", "best_step", "stopped_early", "train_loss", "steps",
        "step_time_median_s", "train_runtime_s",
    )  # fmt: skip
    return "\n".join(
        f"{k:>20}: {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k:>20}: {metrics[k]}" for k in keys
    )


def _run_from_namespace(namespace: argparse.Namespace) -> int:
    args = dataclass_from_namespace(ImageClassificationArguments, namespace)
    metrics = train_image_classification(args)
    if is_rank_zero():
        print(summary(metrics))
    return 0


DESCRIPTION = (
    "Train an image classifier (any registered backbone: a preset, a model directory or a Hub id) on a datasets "
    "data set or the embedded digits. The model is selected on the validation split (carved from train when the "
    "data set has none); the test split is evaluated once, on the selected model. Several processes: accelerate "
    "launch -m hf_kan.train.image_classification ..."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every :class:`ImageClassificationArguments` field as an option."""
    add_dataclass_arguments(parser, ImageClassificationArguments)


def add_subparser(subparsers: Any) -> None:
    """Register ``hf-kan train``."""
    parser = subparsers.add_parser(
        "train",
        help="train an image classifier (any registered backbone) on a datasets data set or the embedded digits",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=_run_from_namespace)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m hf_kan.train.image_classification`` / ``accelerate launch -m ...``."""
    from ..cli import HelpFormatter, run_command

    parser = argparse.ArgumentParser(
        prog="hf_kan.train.image_classification", description=DESCRIPTION, formatter_class=HelpFormatter
    )
    add_arguments(parser)
    parser.set_defaults(func=_run_from_namespace)
    return run_command(parser.prog, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
