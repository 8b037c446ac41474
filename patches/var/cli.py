"""The ``calibrate-var`` command: find VAR's sink dimensions of a saved model and, with ``--save``, store them.

``hf-kan calibrate-var MODEL_DIR [--num-dims N] [--save] [--tau T] [--p P] [--rho R]``. Apart from ``calibrate.py``
because it turns VAR on through the public ``apply``, which resolves ``var=`` with ``calibrate.find_sink_dims``.
"""

from __future__ import annotations

import argparse

import torch

from ...errors import HFKanConfigError
from ..api import apply
from ..engine.spec import cli_help
from .calibrate import sink_dim_scores


def _run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype="auto").eval()
    if args.num_dims < 1:
        raise HFKanConfigError(f"--num-dims must be a positive int, got {args.num_dims}")
    scores = sink_dim_scores(model)
    dims = [int(i) for i in torch.topk(scores, min(args.num_dims, scores.numel())).indices]
    print(f"sink dimensions of {args.model_dir}: {dims}")
    for d in dims:
        print(f"  dim {d}: first-token |x_d / RMS(x)| = {float(scores[d]):.1f}")
    if args.save:
        options = {"sink_dims": dims}
        for name in ("tau", "p", "rho"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
        cfg = apply(model, var=options)
        model.config.save_pretrained(args.model_dir)
        print(f"stored var={cfg.var.to_dict()} in {args.model_dir}/config.json")
    return 0


def add_subparser(subparsers) -> None:
    """``hf-kan calibrate-var MODEL_DIR [--num-dims N] [--save]``."""
    p = subparsers.add_parser(
        "calibrate-var",
        help=cli_help("calibrate-var"),
        description="Find the hidden dimensions with massive first-token activations (VAR's D_sink) of a saved "
                    "LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL model; with --save, turn VAR on in its config.json.",
    )
    p.add_argument("model_dir", help="a directory written by save_pretrained")
    p.add_argument("--num-dims", type=int, default=2, help="how many dimensions to keep (default 2)")
    p.add_argument("--save", action="store_true", help="write var={sink_dims: ...} into the model's config.json")
    p.add_argument("--tau", type=float, default=None, help="sink threshold to store (default 20)")
    p.add_argument("--p", type=float, default=None, help="share of attention sinks keep (default 0.6)")
    p.add_argument("--rho", type=float, default=None, help="image-centric threshold, paper convention (default 0.8)")
    p.set_defaults(func=_run)


__all__ = ["add_subparser"]
