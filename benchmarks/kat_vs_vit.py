"""KAT vs ViT on CPU: GroupRational vs GELU, and a KAT-T vs ViT-T training step, measured side by side.

Two comparisons, each reported as a ratio (ours / baseline) of medians over repeated runs after warm-up;
the two sides are timed in alternating rounds so that load changes on a shared machine hit both alike:

1. activation forward + backward: ``GroupRational`` (8 groups, shared numerator, swish init, the KAT-T
   layout) vs ``nn.GELU`` on the two KAT-T activation shapes ``[B, 197, 192]`` (rational_1, before fc1)
   and ``[B, 197, 768]`` (rational_2, before fc2);
2. one training step (forward, cross-entropy, backward, AdamW step) of KAT-T vs ViT-T (same
   shapes, GELU MLP) at 224 px, patch 16, 1000 classes, random images.

The rational op runs on the backend ``hf_kan.ops.rational`` dispatches to by default; ``--rational-backend``
sets ``HF_KAN_RATIONAL_BACKEND`` to pick another (reference / cpu / triton / auto).

    python benchmarks/kat_vs_vit.py                      # defaults: B=8 activations, batch 8 steps
    python benchmarks/kat_vs_vit.py --rational-backend reference --json out.json --csv out.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Callable


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rational-backend", default=None, help="sets HF_KAN_RATIONAL_BACKEND (default: leave as is)")
    parser.add_argument("--act-batch", type=int, default=8, help="B of the activation shapes [B, 197, C]")
    parser.add_argument("--step-batch", type=int, default=8, help="images per training step")
    parser.add_argument("--image-size", type=int, default=224, help="image size of the training-step models")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before measuring")
    parser.add_argument("--repeats", type=int, default=15, help="timed activation runs per side")
    parser.add_argument("--step-repeats", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--skip-step", action="store_true", help="only benchmark the activations")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--json", default=None, help="write rows and environment to this JSON file")
    return parser.parse_args()


def _alternating_medians(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time (s) of each callable, run in alternating rounds after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def _fwd_bwd(module, x, grad) -> Callable[[], None]:
    """A closure running ``module`` forward on a fresh leaf copy of ``x`` and backward with ``grad``."""

    def run() -> None:
        module(x.detach().requires_grad_(True)).backward(grad)

    return run


def bench_activations(args: argparse.Namespace) -> list[dict]:
    """GroupRational vs GELU forward + backward on the KAT-T activation shapes."""
    import torch

    from hf_kan.modules.group_rational import GroupRational
    from hf_kan.ops.rational import resolve_backend

    rows = []
    for channels, where in ((192, "rational_1 [B,197,192]"), (768, "rational_2 [B,197,768]")):
        x = torch.randn(args.act_batch, 197, channels)
        grad = torch.randn_like(x)
        rational = GroupRational(channels, num_groups=8, init="swish", backend=None)
        gelu = torch.nn.GELU()

        medians = _alternating_medians(
            {"ours": _fwd_bwd(rational, x, grad), "base": _fwd_bwd(gelu, x, grad)}, args.warmup, args.repeats
        )
        rows.append(
            {
                "benchmark": f"act fwd+bwd {where.replace('B', str(args.act_batch), 1)}",
                "ours": "GroupRational",
                "baseline": "nn.GELU",
                "backend": resolve_backend(None, x),
                "ours_ms": 1e3 * medians["ours"],
                "baseline_ms": 1e3 * medians["base"],
                "ratio": medians["ours"] / medians["base"],
            }
        )
    return rows


def bench_training_step(args: argparse.Namespace) -> list[dict]:
    """KAT-T vs ViT-T: forward + cross-entropy + backward + AdamW step on random images."""
    import torch
    from transformers import AutoModelForImageClassification

    import hf_kan
    from hf_kan.ops.rational import resolve_backend

    batch = torch.randn(args.step_batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 1000, (args.step_batch,))
    steps = {}
    models = {}
    for side, preset in (("ours", "kat-tiny"), ("base", "vit-tiny")):
        config = hf_kan.config_from_preset(preset, image_size=args.image_size, num_labels=1000)
        model = AutoModelForImageClassification.from_config(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        models[side] = model

        def step(model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            loss = model(pixel_values=batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[side] = step
    medians = _alternating_medians(steps, max(1, args.warmup - 1), args.step_repeats)
    params = {side: sum(p.numel() for p in m.parameters()) for side, m in models.items()}
    return [
        {
            "benchmark": f"train step batch {args.step_batch} @ {args.image_size}px",
            "ours": f"KAT-T ({params['ours']:,} params)",
            "baseline": f"ViT-T ({params['base']:,} params)",
            "backend": resolve_backend(None, torch.empty(1, 8)),
            "ours_ms": 1e3 * medians["ours"],
            "baseline_ms": 1e3 * medians["base"],
            "ratio": medians["ours"] / medians["base"],
        }
    ]


def _print_table(rows: list[dict]) -> None:
    header = (
        f"{'benchmark':<36} {'ours':<26} {'baseline':<26} {'backend':<9} {'ours ms':>9} {'base ms':>9} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['benchmark']:<36} {r['ours']:<26} {r['baseline']:<26} {r['backend']:<9} "
            f"{r['ours_ms']:>9.2f} {r['baseline_ms']:>9.2f} {r['ratio']:>7.2f}"
        )


def main() -> None:
    args = _parse_args()
    if args.rational_backend is not None:
        os.environ["HF_KAN_RATIONAL_BACKEND"] = args.rational_backend
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = bench_activations(args)
    if not args.skip_step:
        rows += bench_training_step(args)
    load = os.getloadavg()
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1m": load[0],
        "HF_KAN_RATIONAL_BACKEND": os.environ.get("HF_KAN_RATIONAL_BACKEND"),
    }
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cpu_count']} CPUs, 1-min load {load[0]:.1f}")
    print("ratio = ours / baseline (median times, measured in alternating rounds in this run)")
    _print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
