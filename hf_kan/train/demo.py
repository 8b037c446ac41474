"""``hf-kan demo``: train a small KAT and the same-size GELU ViT on the embedded digits, side by side.

Both models are built from the registered presets (``"kat-tiny"`` / ``"vit-tiny"``) with the same overrides
(image size, patch size, width, depth, heads, MLP width), trained with the same recipe by
:func:`hf_kan.train.train_image_classification` (one process, CPU unless a GPU is present), and evaluated on
the held-out digits. The demo prints both test accuracies and the ratio of median training-step times
(KAT / ViT: forward + backward + AdamW step). Nothing is downloaded. It runs single-threaded by default
(``--num-threads``): at this size one thread is about as fast as two, and multi-threaded torch slows down by
orders of magnitude when other jobs share the cores. With the defaults, KAT reaches
>= 95 % test accuracy (the demo's target) in about two minutes on a quiet 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

from .image_classification import ImageClassificationArguments, train_image_classification

logger = logging.get_logger(__name__)

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


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The demo's result table: one row per model, then the KAT/ViT step-time ratio when both ran."""
    lines = [f"{'model':<6} {'params':>9} {'test acc':>9} {'best acc':>9} {'step ms':>8} {'train s':>8}"]
    for family, m in results.items():
        lines.append(
            f"{family.upper():<6} {m['num_parameters']:>9,} {m['eval_accuracy']:>9.4f} {m['best_eval_accuracy']:>9.4f} "
            f"{1e3 * m['step_time_median_s']:>8.1f} {m['train_runtime_s']:>8.1f}"
        )
    if "kat" in results and "vit" in results:
        ratio = results["kat"]["step_time_median_s"] / results["vit"]["step_time_median_s"]
        lines.append(f"step-time ratio KAT/ViT (median forward+backward+AdamW step): {ratio:.2f}")
    if "kat" in results:
        reached = results["kat"]["best_eval_accuracy"] >= TARGET_ACCURACY
        lines.append(
            f"KAT target {TARGET_ACCURACY:.0%} test accuracy: {'reached' if reached else 'NOT reached'} "
            f"(best {results['kat']['best_eval_accuracy']:.2%})"
        )
    return "\n".join(lines)


def run_demo(demo: DemoArguments) -> dict[str, dict[str, Any]]:
    """Train every family in ``demo.models`` in turn; return each one's metrics (see ``train_image_classification``)."""
    # The demo's activations are small ([32, 17, 256]); compiling the fused CPU rational op costs more time
    # than it saves here, so it stays eager unless the user asks otherwise.
    os.environ.setdefault("HF_KAN_RATIONAL_CPU_COMPILE", "0")
    results: dict[str, dict[str, Any]] = {}
    for family in demo.models:
        results[family] = train_image_classification(model_arguments(demo, family))
    return results


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
    )
    results = run_demo(demo)
    print(format_table(results))
    print(f"models and metrics saved under {demo.output_dir}/")
    return 0


def add_subparser(subparsers: Any) -> None:
    """Register ``hf-kan demo``."""
    defaults = DemoArguments()
    parser = subparsers.add_parser(
        "demo",
        help="train a small KAT and the same-size ViT on the embedded digits and compare them",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where both models and metrics go")
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="training epochs per model")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="digits are upsampled to this")
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size, help="ViT/KAT patch size")
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size, help="embedding width D")
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers, help="transformer blocks")
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads, help="attention heads")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak AdamW lr")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for init, shuffling and the split")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=defaults.num_threads,
        help="torch CPU threads (default 1: these tiny models gain little from more, and several threads "
        "slow down badly when the cores are shared)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=("kat", "vit"), default=list(defaults.models), help="which models to train"
    )
    parser.add_argument(
        "--progress-bar", action=argparse.BooleanOptionalAction, default=defaults.progress_bar, help="tqdm bars"
    )
    parser.set_defaults(func=_run)


__all__ = ["TARGET_ACCURACY", "DemoArguments", "format_table", "model_arguments", "run_demo"]
