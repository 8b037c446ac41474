"""CPU step time and peak training memory of KArAt-T (G3B) vs ViT-T at the same shapes.

Usage::

    python benchmarks/karat_vs_vit.py                       # 224 px, patch 16 (N = 197), batch 8
    python benchmarks/karat_vs_vit.py --batch-size 32       # the paper's batch size (slower)
    python benchmarks/karat_vs_vit.py --json results.json

Models (random weights, 10 classes, built from the presets ``"karat-tiny-g3b"`` and ``"vit-tiny"`` with the same
image size, patch size and batch):

- ``vit-sdpa``: ViT-T with its default attention (PyTorch SDPA; on CPU the flash kernel keeps no N x N matrix);
- ``vit-eager``: ViT-T with eager softmax attention (keeps the B*H*N*N probabilities for backward);
- ``karat``: KArAt-T G3B with hf-kan's default operator (``karat_implementation="recompute"``);
- ``karat-reference``: KArAt-T G3B with the plain-autograd reference operator (basis tensors and the N x N attention
  matrix kept for backward: the naive implementation, closest to what the paper measured).

Step time: one training step (forward, cross-entropy backward, AdamW step), median over ``--repeats`` runs after a
warm-up, with the models interleaved round by round in one process so that load changes hit all of them alike.
It runs with ``--threads`` intra-op threads (default 1: on a loaded 2-core machine, waiting at the barriers of two
threads made every step 10-80x slower and the ratios meaningless).

Peak memory: each model is measured in its own fresh subprocess (so one model's freed memory cannot hide
another's; two children run at a time). The child builds the model and optimizer, runs one warm-up step
(parameter gradients and AdamW state now exist), records its resident set size (``VmRSS``), resets the kernel's
peak-RSS counter (writes ``5`` to ``/proc/self/clear_refs``), runs one more step and reads the new peak
(``VmHWM``). The reported number is
``VmHWM - VmRSS before the step``: the memory one training step needs on top of the resident model, optimizer
state and runtime (activations saved for backward, gradients, temporaries). glibc is told to serve every block
over 64 KiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``), so freed tensors go back to the OS at once and RSS
follows live tensor memory; a calibration child that allocates and frees a known 256 MiB block inside the measured
step checks the method (it should read about 256 MiB). Needs Linux (``/proc``).

Timings on a shared, loaded machine are noisy: read the ratios, measured side by side, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

VARIANTS = ("vit-sdpa", "vit-eager", "karat", "karat-reference")
MIB = 1024 * 1024


def build(variant: str, image_size: int, patch_size: int) -> Any:
    """The model of ``variant`` (see the module docstring) in training mode."""
    from transformers import AutoModelForImageClassification

    import hf_kan

    shapes = {"image_size": image_size, "patch_size": patch_size, "num_labels": 10}
    if variant.startswith("vit"):
        config = hf_kan.config_from_preset("vit-tiny", **shapes)
        model = AutoModelForImageClassification.from_config(config, attn_implementation=variant.split("-")[1])
    elif variant in ("karat", "karat-reference"):
        implementation = "reference" if variant == "karat-reference" else "recompute"
        config = hf_kan.config_from_preset("karat-tiny-g3b", karat_implementation=implementation, **shapes)
        model = AutoModelForImageClassification.from_config(config)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return model.train()


def make_step(model: Any, batch_size: int, image_size: int) -> Any:
    """A closure running one training step (forward, backward, AdamW) on a fixed random batch."""
    import torch

    torch.manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, 10, (batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_memory_child(variant: str, batch_size: int, image_size: int, patch_size: int) -> dict[str, float]:
    """Run inside a fresh process: peak RSS increase of one training step of ``variant`` (see module docstring)."""
    import gc

    import torch

    torch.set_num_threads(1)  # per-thread scratch buffers should not differ between variants
    if variant == "calibration":
        model = build("vit-sdpa", image_size, patch_size)

        def step() -> None:
            block = torch.ones(256 * MIB // 4)  # 256 MiB, touched
            del block
    else:
        model = build(variant, image_size, patch_size)
        step = make_step(model, batch_size, image_size)
        step()
    gc.collect()
    before_kib = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    step()
    peak_kib = _proc_status_kib("VmHWM")
    return {
        "step_peak_mib": (peak_kib - before_kib) / 1024,
        "resident_before_mib": before_kib / 1024,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def measure_memory(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Spawn a child process that runs :func:`measure_memory_child` and return its result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, __file__, "--child", variant, "--batch-size", str(args.batch_size),
        "--image-size", str(args.image_size), "--patch-size", str(args.patch_size),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory child for {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_time(args: argparse.Namespace) -> dict[str, float]:
    """Median step time of every variant, interleaved round by round in this process."""
    steps = {v: make_step(build(v, args.image_size, args.patch_size), args.batch_size, args.image_size)
             for v in VARIANTS}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per model (median reported)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="intra-op threads for the timing (default 1: on a shared machine, multi-thread barriers dominate)",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-time", action="store_true", help="only measure memory")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        print(json.dumps(measure_memory_child(args.child, args.batch_size, args.image_size, args.patch_size)))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    n_tokens = (args.image_size // args.patch_size) ** 2 + 1
    print(
        f"KArAt-T (G3B) vs ViT-T: image {args.image_size}, patch {args.patch_size} (N={n_tokens}), "
        f"batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    calibration = measure_memory("calibration", args)
    print(f"memory-method calibration: a 256.0 MiB block inside the step reads {calibration['step_peak_mib']:.1f} MiB")
    with ThreadPoolExecutor(max_workers=2) as pool:
        memory = dict(zip(VARIANTS, pool.map(lambda v: measure_memory(v, args), VARIANTS)))
    times = None if args.skip_time else measure_time(args)

    header = f"{'model':<16} {'params':>10} {'step peak MiB':>14} {'mem / vit-sdpa':>15} {'mem / vit-eager':>16}"
    if times:
        header += f" {'step s':>8} {'time / vit-sdpa':>16}"
    print(header)
    for v in VARIANTS:
        m = memory[v]
        row = (
            f"{v:<16} {m['num_parameters']:>10,} {m['step_peak_mib']:>14.1f} "
            f"{m['step_peak_mib'] / memory['vit-sdpa']['step_peak_mib']:>15.2f} "
            f"{m['step_peak_mib'] / memory['vit-eager']['step_peak_mib']:>16.2f}"
        )
        if times:
            row += f" {times[v]:>8.3f} {times[v] / times['vit-sdpa']:>16.2f}"
        print(row)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "calibration": calibration, "memory": memory, "step_time_s": times},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
