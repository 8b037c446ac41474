"""``hf-kan demo``: train a small KAT and the same-size GELU ViT on the embedded digits, side by side.

Both models are built from the registered presets (``"kat-tiny"`` / ``"vit-tiny"``) with the same overrides
(image size, patch size, width, depth, heads, MLP width) and trained with the same recipe by
:func:`hf_kan.train.train_image_classification` (one process, CPU unless a GPU is present) on the digits' fixed
train split. Each run keeps the parameters with the best accuracy on the validation split; the test split is
evaluated once, on that selected model, after training, and that test accuracy is what the demo prints and judges
the 95 % target on.

Speed: after training, one training step (forward, cross-entropy, backward, clipping, AdamW) of each model is timed
on the same batch in alternating blocks (KAT, ViT, ViT, KAT, ...), so both see the same machine load; the demo prints
the median of the per-round KAT/ViT ratios and their interquartile range. Nothing is downloaded. It runs
single-threaded by default (``--num-threads``): at this size one thread is about as fast as two, and multi-threaded
torch slows down badly when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .image_classification import ImageClassificationArguments, train_image_classification

TARGET_ACCURACY = 0.95


@dataclass
class DemoArguments:
    """Options of ``hf-kan demo``; the defaults are the tested recipe."""

    output_dir: str = "outputs/hf-kan-demo"
    epochs: float = 20.0
    image_size: int = 16
    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    num_threads: int | None = 1
    models: tuple[str, ...] = ("kat", "vit")
    progress_bar: bool = True
    timing_rounds: int = 30
    timing_block: int = 5
    extra_overrides: dict[str, Any] = field(default_factory=dict)


def model_arguments(demo: DemoArguments, family: str) -> ImageClassificationArguments:
    """The training arguments of one side of the demo (``family`` is ``"kat"`` or ``"vit"``)."""
    overrides = {
        "hidden_size": demo.hidden_size,
        "num_hidden_layers": demo.num_layers,
        "num_attention_heads": demo.num_heads,
        "intermediate_size": 4 * demo.hidden_size,
        **demo.extra_overrides,
    }
    return ImageClassificationArguments(
        model=f"{family}-tiny",
        image_size=demo.image_size,
        patch_size=demo.patch_size,
        config_overrides=overrides,
        output_dir=os.path.join(demo.output_dir, family),
        epochs=demo.epochs,
        batch_size=demo.batch_size,
        learning_rate=demo.learning_rate,
        seed=demo.seed,
        progress_bar=demo.progress_bar,
        num_threads=demo.num_threads,
    )


def time_training_steps(demo: DemoArguments, families: tuple[str, ...] = ("kat", "vit")) -> dict[str, Any]:
    """Time one training step of each model, interleaved, on the same batch of the digits' train split.

    Each of ``demo.timing_rounds`` rounds runs ``demo.timing_block`` steps of every model (the order alternates
    from round to round) after warm-up. Returns ``step_s`` (per family: median seconds per step over rounds),
    ``ratios`` (per round: first family's step time / second's), ``ratio_median``, ``ratio_q1``, ``ratio_q3``.
    """
    from ..data import load_digits_dataset
    from .image_classification import build_model, make_optimizer, resolve_config

    if demo.num_threads is not None:
        torch.set_num_threads(demo.num_threads)
    torch.manual_seed(demo.seed)
    steps = {}
    for family in families:
        args = model_arguments(demo, family)
        config, from_preset = resolve_config(args)
        model = build_model(args, config, from_preset, [str(i) for i in range(10)]).train()
        steps[family] = (model, make_optimizer(model, args), args.max_grad_norm)
    num_channels = next(iter(steps.values()))[0].config.num_channels
    batch = load_digits_dataset(demo.image_size, num_channels)["train"].with_format("torch")[: demo.batch_size]
    pixel_values, labels = batch["pixel_values"], batch["label"]

    def run(family: str, count: int) -> float:
        model, optimizer, max_grad_norm = steps[family]
        start = time.perf_counter()
        for _ in range(count):
            loss = model(pixel_values=pixel_values, labels=labels).loss
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / count

    for family in families:
        run(family, 3 * demo.timing_block)  # warm-up (allocator, compiled kernels' first call)
    per_round: dict[str, list[float]] = {family: [] for family in families}
    for round_index in range(demo.timing_rounds):
        for family in families if round_index % 2 == 0 else reversed(families):
            per_round[family].append(run(family, demo.timing_block))
    first, second = families
    ratios = [a / b for a, b in zip(per_round[first], per_round[second])]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0], ratios[0], ratios[0]]
    return {
        "step_s": {family: statistics.median(times) for family, times in per_round.items()},
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_q1": quartiles[0],
        "ratio_q3": quartiles[2],
        "rounds": demo.timing_rounds,
        "block": demo.timing_block,
    }


def format_table(results: dict[str, dict[str, Any]], timing: dict[str, Any] | None = None) -> str:
    """The demo's result table: one row per model (validation accuracy of the selected model, its test accuracy,
    interleaved step time when measured), then the KAT/ViT step-time ratio and the verdict on the target."""
    lines = [f"{'model':<6} {'params':>9} {'val acc':>8} {'test acc':>9} {'step ms':>8} {'train s':>8}"]
    for family, m in results.items():
        step_ms = f"{1e3 * timing['step_s'][family]:.1f}" if timing and family in timing["step_s"] else "-"
        lines.append(
            f"{family.upper():<6} {m['num_parameters']:>9,} {m['validation_accuracy']:>8.4f} "
            f"{m['test_accuracy']:>9.4f} {step_ms:>8} {m['train_runtime_s']:>8.1f}"
        )
    lines.append(
        "val acc: the selected model (best validation accuracy); test acc: that model on the test split, "
        "evaluated once after training"
    )
    if timing is not None:
        lines.append(
            f"step-time ratio KAT/ViT: {timing['ratio_median']:.2f} (median of {timing['rounds']} interleaved "
            f"rounds of {timing['block']} steps, same batch; interquartile range "
            f"{timing['ratio_q1']:.2f}-{timing['ratio_q3']:.2f})"
        )
    if "kat" in results:
        accuracy = results["kat"]["test_accuracy"]
        verdict = "reached" if accuracy >= TARGET_ACCURACY else "NOT reached"
        lines.append(f"KAT target {TARGET_ACCURACY:.0%} test accuracy: {verdict} ({accuracy:.2%})")
    return "\n".join(lines)


def run_demo(demo: DemoArguments) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Train every family in ``demo.models`` in turn, then time their training steps side by side (when both
    KAT and ViT ran). Returns each family's metrics (see ``train_image_classification``) and the timing."""
    results = {family: train_image_classification(model_arguments(demo, family)) for family in demo.models}
    timing = None
    if set(demo.models) == {"kat", "vit"} and demo.timing_rounds > 0:
        timing = time_training_steps(demo)
    return results, timing


def _run(namespace: argparse.Namespace) -> int:
    demo = DemoArguments(
        output_dir=namespace.output_dir,
        epochs=namespace.epochs,
        image_size=namespace.image_size,
        patch_size=namespace.patch_size,
        hidden_size=namespace.hidden_size,
        num_layers=namespace.num_layers,
        num_heads=namespace.num_heads,
        batch_size=namespace.batch_size,
        learning_rate=namespace.learning_rate,
        seed=namespace.seed,
        num_threads=namespace.num_threads,
        models=tuple(namespace.models),
        progress_bar=namespace.progress_bar,
        timing_rounds=namespace.timing_rounds,
        timing_block=namespace.timing_block,
    )
    results, timing = run_demo(demo)
    print(format_table(results, timing))
    print(f"models, metrics.json and image processors saved under {demo.output_dir}/")
    return 0


def add_subparser(subparsers: Any) -> None:
    """Register ``hf-kan demo``."""
    from ..cli import DefaultsHelpFormatter

    defaults = DemoArguments()
    parser = subparsers.add_parser(
        "demo",
        formatter_class=DefaultsHelpFormatter,
        help="train a small KAT and the same-size ViT on the embedded digits and compare them",
        description="Train a small KAT and the same-size GELU ViT on the embedded digits with the same recipe; "
        "select each on the validation split, report its test accuracy (test split evaluated once, at the end) "
        "and the KAT/ViT training-step time ratio, timed interleaved on the same batch.",
    )
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where both models and their metrics go")
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="training epochs per model")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="digits are upsampled to this")
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size, help="ViT/KAT patch size")
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size, help="embedding width D")
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers, help="transformer blocks")
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads, help="attention heads")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak AdamW lr")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for initialisation and shuffling")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=defaults.num_threads,
        help="torch CPU threads (these tiny models gain little from more, and several threads slow down badly "
        "when the cores are shared)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=("kat", "vit"), default=list(defaults.models), help="which models to train"
    )
    parser.add_argument(
        "--timing-rounds", type=int, default=defaults.timing_rounds,
        help="interleaved rounds for the step-time ratio (0: skip the timing)",
    )  # fmt: skip
    parser.add_argument(
        "--timing-block", type=int, default=defaults.timing_block, help="training steps per model and round"
    )
    parser.add_argument(
        "--progress-bar", action=argparse.BooleanOptionalAction, default=defaults.progress_bar, help="tqdm bars"
    )
    parser.set_defaults(func=_run)


__all__ = ["TARGET_ACCURACY", "DemoArguments", "format_table", "model_arguments", "run_demo", "time_training_steps"]
