"""Train DyVTE routers on a frozen VLM, under ``accelerate launch`` or plain Python (``hf-kan dyvte-train``).

Command line::

    hf-kan dyvte-train --output-dir runs/dyvte                        # embedded tiny LLaVA + generated samples
    accelerate launch --num_processes 1 -m hf_kan.patches.dyvte.train --output-dir runs/dyvte
    hf-kan dyvte-train --model path/to/saved-llava --output-dir runs/dyvte

Exit labels come from the frozen model (methods.md section 6). For each sample with answer tokens ``A`` (``labels``
``!= -100``) and a sampled router layer ``l``:

    full   = logits of the unpatched model (teacher-forced prompt + answer)
    exited = logits with every visual key masked in layers > l (the exit simulated by masking)
    agree  = mean over A of [argmax full == argmax exited]
    label  = exit (1) if agree > 0.99 and CE(exited, A) < 1.03 * CE(full, A), else keep (0)

The router input is read from the full forward at layer ``l``'s output (identical to the exited run up to there),
at the last PROMPT token (the token before the first answer token), with the text mean over the prompt's text after
the image and before that token (the authors' features). Only the routers train (2-class cross-entropy on detached
features); every model weight is frozen. DyVTE and pruning are switched off while labels are made.

Model selection: the routers are evaluated on a VALIDATION split every ``eval_steps`` steps and at the end (router
cross-entropy and accuracy on its exit examples); the best evaluation's routers are kept
(:class:`hf_kan.train.selection.ModelSelector`, optional early stopping) and evaluated ONCE on the TEST split. The
model is frozen, so each held-out split's labelled examples are made once, for a fixed draw of router layers per
sample (by default every router layer). The command generates its data, carves the validation split from the
training samples (:func:`hf_kan.train.splits.resolve_splits`) and generates separate test samples. Outputs:
``save_pretrained`` of the model with the selected routers and the ``dyvte`` config (reload with
``hf_kan.patches.from_pretrained``), ``metrics.json`` and ``training_args.json``.

The default data are generated (``data.py``): a smoke test of the recipe on random weights, NOT the paper's
training run (1% of LLaVA-665k, lr 6e-5, 1 epoch). For real data call ``train_routers(model, loader,
validation=..., test=...)`` from Python.

The ``Accelerator`` comes from :func:`hf_kan.train.runtime.make_accelerator` (CPU processes of a multi-process launch
without GPUs form one gloo group), as in the other trainers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ...errors import HFKanConfigError, InputLayoutError
from ...train.cli_args import add_dataclass_arguments, dataclass_from_namespace
from ...train.runtime import finish, is_rank_zero, make_accelerator, write_run_files
from ...train.splits import DEFAULT_SPLIT_SEED, DEFAULT_VALIDATION_FRACTION, resolve_splits
from ..api import apply, status
from ..engine.config import CONFIG_ATTRIBUTE
from ..engine.hooks import extra_runtime
from ..engine.runtime import PatchRuntime
from ..engine.spec import cli_help
from .data import collate, generate_samples, tiny_llava
from .routers import router_features, routers_of
from .runtime import EXIT, VisualKeyMask

logger = logging.get_logger(__name__)
IGNORE = -100


# --------------------------------------------------------------------------------------------- exit labels


def exit_label(full_logits: torch.Tensor, exit_logits: torch.Tensor, labels: torch.Tensor, agreement: float = 0.99,
               loss_ratio: float = 1.03) -> dict[str, torch.Tensor]:
    """Per-sample exit labels from teacher-forced logits ``(B, T, V)`` of the full and the exited run and ``labels``
    ``(B, T)`` (answer token ids, ``-100`` elsewhere; the token at column ``t`` is predicted at ``t - 1``).

    Returns ``label`` ``(B,)`` (1 = exit is fine: ``agreement`` of argmaxes ``> agreement`` and exited loss
    ``< loss_ratio x`` full loss), ``agreement``, ``exit_loss``, ``full_loss`` (mean CE over the answer tokens)."""
    target = labels[:, 1:]
    answer = target != IGNORE
    count = answer.sum(-1)
    if bool((count == 0).any()):
        raise InputLayoutError("exit_label: every sample needs at least one answer token (labels != -100)")
    full, exited = full_logits[:, :-1].float(), exit_logits[:, :-1].float()
    same = (full.argmax(-1) == exited.argmax(-1)) & answer
    agree = same.sum(-1) / count
    safe = target.clamp(min=0)

    def ce(logits):
        return (F.cross_entropy(logits.transpose(1, 2), safe, reduction="none") * answer).sum(-1) / count

    full_loss, exit_loss = ce(full), ce(exited)
    label = (agree > agreement) & (exit_loss < loss_ratio * full_loss)
    return {"label": label.long(), "agreement": agree, "exit_loss": exit_loss, "full_loss": full_loss}


class _FeatureRecorder(PatchRuntime):
    """Records router features at given layers' outputs for a given last-prompt column per sample."""

    name = "dyvte_features"
    uses_layer_hooks = True

    def __init__(self, layers, last: torch.Tensor):
        super().__init__(None)
        self.layers = set(layers)
        self.last = last
        self.features: dict[int, torch.Tensor] = {}

    def after_layer(self, state, layer_idx, hidden_states):
        if layer_idx in self.layers:
            hidden = hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states
            if state.row_positions(layer_idx) is not None:
                raise InputLayoutError("DyVTE label making needs every token in every layer (turn pruning off)")
            self.features[layer_idx] = router_features(hidden, state.layout, self.last).detach()
        return None


@contextlib.contextmanager
def _frozen_reference(model: nn.Module):
    """The model with DyVTE and pruning off (the frozen full-image reference), restored afterwards."""
    text_config = model.config.get_text_config()
    saved = getattr(text_config, CONFIG_ATTRIBUTE, None)
    if not status(model)["hooks_attached"]:
        apply(model)
    stripped = {k: v for k, v in (saved or {}).items() if k not in ("dyvte", "prune")}
    setattr(text_config, CONFIG_ATTRIBUTE, stripped)
    try:
        yield model
    finally:
        setattr(text_config, CONFIG_ATTRIBUTE, saved)


@torch.no_grad()
def make_exit_examples(model: nn.Module, batch: dict, layers: torch.Tensor, agreement: float = 0.99,
                       loss_ratio: float = 1.03) -> dict[str, torch.Tensor]:
    """Labelled router examples from one batch (model inputs + ``labels``) for the router layers ``layers``
    ``(B, k)`` (``k`` sampled layers per sample): one full forward (features of every needed layer, full logits) and
    ``k`` forwards with the exit simulated by masking. Returns flat ``features`` ``(B k, 2h)``, ``layers``, ``label``,
    ``agreement``, ``exit_loss``, ``full_loss`` (``(B k,)`` each, sample-major)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch.get("labels")
    if labels is None:
        raise InputLayoutError("DyVTE label making needs 'labels' in the batch: the answer ids, -100 elsewhere")
    t = labels.shape[1]
    col = torch.arange(t, device=labels.device)[None]
    first_answer = torch.where(labels != IGNORE, col, t).min(-1).values
    if bool((first_answer < 1).any()) or bool((first_answer >= t).any()):
        raise InputLayoutError("DyVTE label making: every sample needs a prompt followed by answer tokens")
    layers = layers.to(torch.long).cpu()
    with _frozen_reference(model):
        was_training = model.training
        model.eval()
        try:
            rec = _FeatureRecorder(layers.unique().tolist(), first_answer - 1)
            with extra_runtime(model, rec):
                full = model(**inputs, use_cache=False).logits
            out: dict[str, list] = {"features": [], "layers": [], "label": [], "agreement": [], "exit_loss": [],
                                    "full_loss": []}
            for j in range(layers.shape[1]):
                lj = layers[:, j]
                with extra_runtime(model, VisualKeyMask(lj)):
                    exited = model(**inputs, use_cache=False).logits
                stats = exit_label(full, exited, labels, agreement, loss_ratio)
                feats = torch.stack([rec.features[int(lj[b])][b] for b in range(lj.shape[0])])
                out["features"].append(feats)
                out["layers"].append(lj)
                for key in ("label", "agreement", "exit_loss", "full_loss"):
                    out[key].append(stats[key].cpu())
        finally:
            model.train(was_training)
    # sample-major order: sample b's k examples are consecutive
    return {k: torch.stack(v, 1).flatten(0, 1) for k, v in out.items()}


# --------------------------------------------------------------------------------------------- training


def held_out_examples(model: nn.Module, batches: Iterable[dict], layers_per_sample: int | None = None, seed: int = 0,
                      agreement: float = 0.99, loss_ratio: float = 1.03) -> dict[str, torch.Tensor]:
    """The labelled router examples of a held-out split (``make_exit_examples`` over ``batches``), for a fixed draw
    of ``layers_per_sample`` router layers per sample (``None``: every router layer). Made once: the model is
    frozen, so the examples never change while the routers train."""
    routers = routers_of(model)
    eligible = torch.tensor(routers.layers)
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list] = {}
    for batch in batches:
        b = batch["input_ids"].shape[0]
        if layers_per_sample is None:
            layers = eligible.expand(b, -1)
        else:
            layers = eligible[torch.randint(len(eligible), (b, layers_per_sample), generator=gen)]
        for key, value in make_exit_examples(model, batch, layers, agreement, loss_ratio).items():
            parts.setdefault(key, []).append(value.cpu())
    if not parts:
        raise InputLayoutError("a held-out split of the DyVTE training data has no batch")
    return {key: torch.cat(value) for key, value in parts.items()}


@torch.no_grad()
def evaluate_routers(routers: nn.Module, examples: dict[str, torch.Tensor], split: str) -> dict[str, float]:
    """``{split}_loss`` (mean 2-class cross-entropy of the routers on the split's exit examples), ``{split}_accuracy``
    (routers' argmax == label), ``{split}_exit_label`` (share of examples labelled exit), ``{split}_predicted_exit``
    (share the routers exit at threshold 0.5) and ``{split}_examples``."""
    was_training = routers.training
    routers.eval()
    device = next(routers.parameters()).device
    logits = routers(examples["features"].to(device), examples["layers"].to(device)).float()
    target = examples["label"].to(device)
    routers.train(was_training)
    predicted = logits.argmax(-1) == EXIT
    return {f"{split}_loss": float(F.cross_entropy(logits, target)),
            f"{split}_accuracy": float((predicted.long() == target).float().mean()),
            f"{split}_exit_label": float(target.float().mean()),
            f"{split}_predicted_exit": float(predicted.float().mean()),
            f"{split}_examples": int(target.numel())}


def train_routers(model: nn.Module, loader: Iterable[dict], *, validation: Iterable[dict] | None = None,
                  test: Iterable[dict] | None = None, epochs: int = 1, learning_rate: float = 6e-5,
                  layers_per_sample: int = 1, eval_layers_per_sample: int | None = None, eval_steps: int = 10,
                  early_stopping_patience: int | None = None, agreement: float = 0.99, loss_ratio: float = 1.03,
                  seed: int = 0, accelerator=None, max_steps: int | None = None) -> dict[str, Any]:
    """Train the routers of ``model`` (DyVTE applied: ``hf_kan.patches.apply(model, dyvte=...)``) on ``loader``
    (batches of model inputs + ``labels``) with 2-class cross-entropy on labels from ``make_exit_examples``; for each
    sample ``layers_per_sample`` router layers are drawn uniformly from ``dyvte.layers``. All other weights are
    frozen. Under ``accelerate`` only the routers are wrapped for data parallelism.

    ``validation`` (batches like ``loader``'s): evaluated every ``eval_steps`` steps and at the end
    (:func:`evaluate_routers` on :func:`held_out_examples` with ``eval_layers_per_sample`` layers per sample, every
    router layer by default); the routers of the lowest validation loss are kept (``ModelSelector``), and training
    stops after ``early_stopping_patience`` evaluations without improvement. Without ``validation`` the final
    routers are kept. ``test``: evaluated once, on the kept routers, after training. Returns the metrics."""
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    from ...train.selection import ModelSelector

    routers = routers_of(model)
    if routers is None:
        raise HFKanConfigError("train_routers needs DyVTE routers on the model: call "
                               "hf_kan.patches.apply(model, dyvte=True) first")
    if layers_per_sample < 1 or (eval_layers_per_sample is not None and eval_layers_per_sample < 1):
        raise HFKanConfigError(f"layers_per_sample and eval_layers_per_sample must be >= 1, got {layers_per_sample} "
                               f"and {eval_layers_per_sample}")
    if eval_steps < 1:
        raise HFKanConfigError(f"eval_steps must be >= 1, got {eval_steps}")
    acc = accelerator or make_accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    model.requires_grad_(False)
    model.to(acc.device)
    rule = dict(agreement=agreement, loss_ratio=loss_ratio)
    # every process makes the same validation examples (same seed, frozen model), so selection agrees across ranks
    val_examples = None
    if validation is not None:
        val_examples = held_out_examples(model, validation, eval_layers_per_sample, seed=seed + 1, **rule)
    routers.requires_grad_(True)
    optimizer = torch.optim.AdamW(routers.parameters(), lr=learning_rate)
    wrapped, optimizer, loader = acc.prepare(routers, optimizer, loader)
    eligible = torch.tensor(routers.layers)
    gen = torch.Generator().manual_seed(seed + acc.process_index)
    selector = ModelSelector("validation_loss", "min", patience=early_stopping_patience, trainable_only=True)
    history: list[dict[str, Any]] = []
    total = max_steps if max_steps is not None else (epochs * len(loader) if hasattr(loader, "__len__") else None)
    progress = tqdm(total=total, desc="dyvte-train", disable=not acc.is_local_main_process)
    losses, exit_fraction, accuracy, step = [], [], [], 0

    def validate() -> None:
        result = evaluate_routers(routers, val_examples, "validation") | {"step": step}
        history.append(result)
        selector.update(routers, result, step)

    def done() -> bool:
        return (max_steps is not None and step >= max_steps) or selector.should_stop

    wrapped.train()
    for _ in range(epochs):
        for batch in loader:
            b = batch["input_ids"].shape[0]
            layers = eligible[torch.randint(len(eligible), (b, layers_per_sample), generator=gen)]
            ex = make_exit_examples(model, batch, layers, **rule)
            target = ex["label"].to(acc.device)
            logits = wrapped(ex["features"].to(acc.device), ex["layers"].to(acc.device))
            loss = F.cross_entropy(logits.float(), target)
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            losses.append(acc.reduce(loss.detach(), reduction="mean").item())
            exit_fraction.append(float(target.float().mean()))
            accuracy.append(float(((logits.argmax(-1) == EXIT).long() == target).float().mean()))
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", exit=f"{exit_fraction[-1]:.2f}")
            if val_examples is not None and step % eval_steps == 0:
                validate()
            if done():
                break
        if done():
            break
    progress.close()
    if not losses:
        raise InputLayoutError("train_routers: the loader produced no batch")
    metrics: dict[str, Any] = {"steps": step, "num_processes": acc.num_processes, "first_loss": losses[0],
                               "final_loss": losses[-1], "mean_exit_label": sum(exit_fraction) / len(exit_fraction),
                               "final_router_accuracy": accuracy[-1]}
    if val_examples is not None:
        if not history or history[-1]["step"] != step:
            validate()
        selector.restore(routers)
        best = {k: v for k, v in selector.best_metrics.items() if k != "step"}
        metrics.update(best, best_step=selector.best_step, stopped_early=selector.should_stop,
                       selection=selector.summary(), history=history)
    if test is not None:  # the kept routers; the test split is seen here for the first and only time
        test_examples = held_out_examples(model, test, eval_layers_per_sample, seed=seed + 2, **rule)
        metrics.update(evaluate_routers(routers, test_examples, "test"))
    routers.requires_grad_(False)
    return metrics


# --------------------------------------------------------------------------------------------- command line


@dataclass
class DyVTETrainArguments:
    """Arguments of ``hf-kan dyvte-train``."""

    output_dir: str = field(default="runs/dyvte", metadata={"help": "where the model, routers and metrics go"})
    model: str | None = field(default=None, metadata={"help": "a saved LLaVA model directory (default: tiny random)"})
    num_samples: int = field(default=64, metadata={"help": "generated samples for training and validation"})
    num_test_samples: int = field(default=16, metadata={"help": "generated test samples (0: no test split)"})
    validation_fraction: float = field(
        default=DEFAULT_VALIDATION_FRACTION, metadata={"help": "share of the training samples held out for validation"}
    )
    split_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata={"help": "seed of the validation split"})
    answer_len: int = field(default=4, metadata={"help": "answer tokens per generated sample"})
    batch_size: int = field(default=8, metadata={"help": "samples per batch and process"})
    epochs: int = field(default=1, metadata={"help": "passes over the data (authors: 1)"})
    learning_rate: float = field(default=6e-5, metadata={"help": "AdamW learning rate (authors: 6e-5)"})
    layers_per_sample: int = field(default=1, metadata={"help": "router layers labelled per sample and step"})
    eval_layers_per_sample: int | None = field(
        default=None, metadata={"help": "router layers labelled per validation / test sample; unset = every layer"}
    )
    eval_steps: int = field(default=4, metadata={"help": "evaluate on the validation split every N steps"})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "stop after N evaluations in a row without improvement; unset = never"}
    )
    router_hidden: int | None = field(default=None, metadata={"help": "router width (default min(2048, 2h))"})
    threshold: float = field(default=0.5, metadata={"help": "exit threshold stored in the config"})
    agreement: float = field(default=0.99, metadata={"help": "argmax agreement an exit must exceed"})
    loss_ratio: float = field(default=1.03, metadata={"help": "exited loss must stay below this x the full loss"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    cpu: bool = field(default=False, metadata={"help": "force CPU"})

    def __post_init__(self) -> None:
        if self.num_samples < 2 or self.num_test_samples < 0 or self.batch_size < 1 or self.eval_steps < 1:
            raise HFKanConfigError("num_samples must be >= 2, num_test_samples >= 0, batch_size and eval_steps >= 1")
        if not 0.0 < self.validation_fraction < 1.0:
            raise HFKanConfigError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise HFKanConfigError(f"early_stopping_patience must be >= 1, got {self.early_stopping_patience}")


def run_dyvte_training(args: DyVTETrainArguments) -> dict[str, Any]:
    """The ``dyvte-train`` command: build or load the model, generate data, split it, train and select the routers,
    test them, save."""
    from accelerate.utils import DistributedDataParallelKwargs

    acc = make_accelerator(cpu=args.cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    try:
        metrics = _run_training(args, acc)
    except BaseException:
        finish(acc, wait=False)
        raise
    finish(acc)
    return metrics


def _run_training(args: DyVTETrainArguments, acc) -> dict[str, Any]:
    from accelerate.utils import set_seed

    set_seed(args.seed)
    if args.model is None:
        model = tiny_llava(seed=args.seed)
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    model.to(acc.device)
    samples = generate_samples(model, args.num_samples + args.num_test_samples, args.answer_len, seed=args.seed)
    raw = {"train": samples[:args.num_samples]}
    if args.num_test_samples:
        raw["test"] = samples[args.num_samples:]
    splits = resolve_splits(raw, validation_fraction=args.validation_fraction, seed=args.split_seed)
    pad = model.config.get_text_config().pad_token_id or 0
    apply(model, dyvte={"router_hidden": args.router_hidden, "threshold": args.threshold})

    def batches(part, shuffle=False):
        return torch.utils.data.DataLoader(part, batch_size=args.batch_size, shuffle=shuffle,
                                           collate_fn=lambda s: collate(s, pad))

    if acc.is_main_process:
        logger.info("DyVTE router training on %d process(es): %s", acc.num_processes, splits.describe())
    metrics = train_routers(
        model, batches(splits.train, shuffle=True), validation=batches(splits.validation),
        test=batches(splits.test) if splits.test is not None else None, epochs=args.epochs,
        learning_rate=args.learning_rate, layers_per_sample=args.layers_per_sample,
        eval_layers_per_sample=args.eval_layers_per_sample, eval_steps=args.eval_steps,
        early_stopping_patience=args.early_stopping_patience, agreement=args.agreement, loss_ratio=args.loss_ratio,
        seed=args.seed, accelerator=acc)
    metrics.update(validation_source=splits.validation_source, test_source=splits.test_source,
                   train_samples=len(splits.train))
    acc.wait_for_everyone()
    if acc.is_main_process:
        model.save_pretrained(args.output_dir)
        write_run_files(args.output_dir, metrics=metrics, args=args)
        test = f"test loss {metrics['test_loss']:.4f}" if "test_loss" in metrics else "no test split"
        logger.info("selected the routers of step %s (validation loss %.4f); %s; written to %s",
                    metrics["best_step"], metrics["validation_loss"], test, args.output_dir)
    return metrics


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DyVTETrainArguments, negatable_bools=False)


def _run(namespace: argparse.Namespace) -> int:
    metrics = run_dyvte_training(dataclass_from_namespace(DyVTETrainArguments, namespace))
    if is_rank_zero():
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    return 0


def add_subparser(subparsers: Any) -> None:
    """Add ``hf-kan dyvte-train``."""
    parser = subparsers.add_parser("dyvte-train", help=cli_help("dyvte-train"),
                                   description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    parser.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hf_kan.patches.dyvte.train`` and
    ``accelerate launch -m hf_kan.patches.dyvte.train``."""
    parser = argparse.ArgumentParser(prog="hf_kan.patches.dyvte.train", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DyVTETrainArguments", "add_subparser", "evaluate_routers", "exit_label", "held_out_examples",
           "make_exit_examples", "run_dyvte_training", "train_routers"]
