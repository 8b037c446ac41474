"""Group-Rational activation: GELU vs reference vs fused CPU path vs Triton, on KAT activation shapes.

Usage::

    python benchmarks/rational.py --device cpu                  # batch 8 x 197 tokens, fp32
    python benchmarks/rational.py --device cuda                 # batch 128 x 197 tokens, bf16, + memory floor
    python benchmarks/rational.py --device cuda --model-step    # also a KAT-T vs ViT-T training step
    python benchmarks/rational.py --csv rational.csv

Shapes: the two activations of each KAT block, ``[batch, 197, C]`` with C = 192/768 (KAT-T), 384/1536 (KAT-S),
768/3072 (KAT-B), G = 8 groups, numerator shared ([1, 6], the checkpoint layout), denominator [8, 4].

Providers: ``gelu`` (``torch.nn.functional.gelu``, what a user would otherwise pick), ``reference`` (eager
autograd through the pure-PyTorch formula), ``cpu`` (fused CPU path, ``torch.compile``'d; CPU only), ``cpu-eager``
(the same fused formulation, not compiled - what runs for small tensors; CPU only), ``triton`` (CUDA only).
Modes: ``fwd`` (forward, no graph), ``bwd`` (backward only: ``torch.autograd.grad`` of a retained graph w.r.t. x and
the coefficients), ``full`` (forward + backward).

Each number is the median of ``--repeats`` runs after warm-up (the minimum is reported too); providers are
interleaved run by run so load changes hit all alike. CPU numbers on a shared machine are noisy: read the ratios to
GELU, and on a loaded machine use ``--threads 1 --clock cpu`` (thread CPU time instead of wall time).

On CUDA the script also measures the copy bandwidth (a large device-to-device copy: bytes read + written over
time) and reports, per row, the memory-traffic floor (bytes the op must read and write: fwd x + out, bwd
x + grad_out + grad_x, full both; the coefficients are negligible) over that bandwidth, and the fraction of the
floor reached (floor / measured).
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_kan.ops.rational import rational_reference
from hf_kan.ops.rational.cpu import RationalCPUFunction, rational_cpu

SHAPES = [("KAT-T", "act1", 192), ("KAT-T", "act2", 768), ("KAT-S", "act1", 384), ("KAT-S", "act2", 1536)]
SHAPES += [("KAT-B", "act1", 768), ("KAT-B", "act2", 3072)]
GROUPS = 8
MODES = ("fwd", "bwd", "full")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _activation(provider: str) -> Callable:
    if provider == "gelu":
        return lambda x, num, den: F.gelu(x)
    if provider == "reference":
        return rational_reference
    if provider == "cpu":
        return lambda x, num, den: rational_cpu(x, num, den, compile=True)
    if provider == "cpu-eager":  # the fused formulation itself, uncompiled (rational_cpu would pick the reference)
        return lambda x, num, den: RationalCPUFunction.apply(x.view(-1, x.shape[-1]), num, den, False).view(x.shape)
    if provider == "triton":
        from hf_kan.ops.rational.triton import rational_triton

        return rational_triton
    raise ValueError(provider)


def _runner(provider: str, mode: str, x, num, den, grad_out) -> Callable[[], None]:
    """A closure doing one timed unit of work for (provider, mode)."""
    fn = _activation(provider)
    inputs = (x, num, den) if provider != "gelu" else (x,)
    if mode == "fwd":

        def run() -> None:
            with torch.no_grad():
                fn(x, num, den)

        return run
    if mode == "full":

        def run() -> None:
            torch.autograd.grad(fn(x, num, den), inputs, grad_out)

        return run
    out = fn(x, num, den)

    def run() -> None:
        torch.autograd.grad(out, inputs, grad_out, retain_graph=True)

    return run


def _time_interleaved(
    runs: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str, clock: str = "wall"
) -> dict:
    """(median, min) seconds per run, providers interleaved round by round.

    ``clock="cpu"`` (CPU only, with one torch thread) times the CPU time of the calling thread
    (``time.thread_time``), which time spent waiting for a core on a loaded machine does not inflate.
    """
    now = time.thread_time if clock == "cpu" else time.perf_counter
    for run in runs.values():
        for _ in range(warmup):
            run()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = now()
                run()
                times[name].append(now() - t0)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), median of 20."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = _time_interleaved({"copy": lambda: dst.copy_(src)}, repeats=20, warmup=3, device=device)["copy"][0]
    return 2 * src.numel() * src.element_size() / t


def bench_activations(args) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    providers = args.providers or (["gelu", "reference"] + (["cpu", "cpu-eager"] if device == "cpu" else ["triton"]))
    if "gelu" not in providers:
        providers = ["gelu", *providers]
    bandwidth = copy_bandwidth(device) if device == "cuda" else None
    if bandwidth:
        print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for model, layer, channels in SHAPES:
        if args.models and model not in args.models:
            continue
        torch.manual_seed(0)
        x = torch.randn(args.batch, args.tokens, channels, device=device, dtype=dtype, requires_grad=True)
        num = torch.randn(1, 6, device=device, requires_grad=True)
        den = torch.randn(GROUPS, 4, device=device, requires_grad=True)
        grad_out = torch.randn_like(x)
        for mode in args.modes:
            runs = {p: _runner(p, mode, x, num, den, grad_out) for p in providers}
            timings = _time_interleaved(runs, args.repeats, args.warmup, device, args.clock)
            medians = {p: t[0] for p, t in timings.items()}
            elem_bytes = x.numel() * x.element_size()
            traffic = {"fwd": 2, "bwd": 3, "full": 5}[mode] * elem_bytes
            for provider in providers:
                row = {
                    "model": model,
                    "layer": layer,
                    "channels": channels,
                    "shape": "x".join(map(str, x.shape)),
                    "dtype": args.dtype,
                    "mode": mode,
                    "provider": provider,
                    "median_ms": medians[provider] * 1e3,
                    "vs_gelu": medians[provider] / medians["gelu"],
                    "min_ms": timings[provider][1] * 1e3,
                    "vs_gelu_min": timings[provider][1] / timings["gelu"][1],
                }
                if bandwidth:
                    row["floor_ms"] = traffic / bandwidth * 1e3
                    row["fraction_of_floor"] = row["floor_ms"] / row["median_ms"]
                rows.append(row)
                extra = f"  floor {row['floor_ms']:.3f} ms ({row['fraction_of_floor']:.0%})" if bandwidth else ""
                print(
                    f"{model} {layer} C={channels:<5} {mode:<4} {provider:<10} {row['median_ms']:9.3f} ms"
                    f"  x{row['vs_gelu']:.2f} vs gelu (min {row['min_ms']:.3f} ms, x{row['vs_gelu_min']:.2f}){extra}",
                    flush=True,
                )
    return rows


def bench_model_step(args) -> list[dict]:
    """One training step (forward, cross-entropy backward, AdamW) of KAT-T vs ViT-T at the same shapes."""
    from transformers import AutoModelForImageClassification

    import hf_kan

    device = args.device
    rows, runs = [], {}
    for name, preset, overrides in (
        ("vit-tiny", "vit-tiny", {}),
        ("kat-tiny", "kat-tiny", {"rational_backend": "auto"}),
        ("kat-tiny-reference", "kat-tiny", {"rational_backend": "reference"}),
    ):
        config = hf_kan.config_from_preset(preset, num_labels=10, **overrides)
        model = AutoModelForImageClassification.from_config(config).to(device).train()
        pixel_values = torch.randn(args.batch, 3, config.image_size, config.image_size, device=device)
        labels = torch.randint(0, 10, (args.batch,), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

        def step(model=model, pixel_values=pixel_values, labels=labels, optimizer=optimizer, autocast=autocast):
            with autocast:
                loss = model(pixel_values=pixel_values, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        runs[name] = step
    medians = {name: t[0] for name, t in _time_interleaved(runs, args.repeats, args.warmup, device).items()}
    for name, seconds in medians.items():
        row = {"model": name, "mode": "train-step", "median_ms": seconds * 1e3, "vs_vit": seconds / medians["vit-tiny"]}
        rows.append(row)
        print(f"train step {name:<20} {row['median_ms']:9.2f} ms  x{row['vs_vit']:.2f} vs vit-tiny", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="images per batch (default 128 on CUDA, 8 on CPU)")
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default bf16 CUDA, fp32 CPU")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--models", nargs="+", choices=("KAT-T", "KAT-S", "KAT-B"))
    parser.add_argument("--providers", nargs="+", choices=("gelu", "reference", "cpu", "cpu-eager", "triton"))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 50 CUDA, 15 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: thread CPU time (CPU device with --threads 1; robust on a loaded machine)",
    )
    parser.add_argument("--model-step", action="store_true", help="also time a KAT-T vs ViT-T training step")
    parser.add_argument("--csv", help="write all rows to this CSV file")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    args.batch = args.batch or (128 if cuda else 8)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (50 if cuda else 15)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (cuda or torch.get_num_threads() != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1 (all work on the timed thread)")
    card = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(
        f"# device={args.device} ({card}) torch={torch.__version__} threads={torch.get_num_threads()} "
        f"batch={args.batch}x{args.tokens} dtype={args.dtype} repeats={args.repeats} clock={args.clock}"
    )
    rows = bench_activations(args)
    if args.model_step:
        rows += bench_model_step(args)
    if args.csv:
        fields = list(dict.fromkeys(key for row in rows for key in row))  # first-seen order
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
