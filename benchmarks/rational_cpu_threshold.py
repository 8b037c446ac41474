"""Where does compiling the CPU rational op pay off? Forward + backward per call, compiled vs eager, by tensor size.

Sets ``hf_kan.ops.rational.cpu.COMPILE_MIN_NUMEL``: below it the op runs eagerly, at or above it through
``torch.compile`` (Inductor C++). For each shape ``[rows, C]`` (G = 8 groups, shared numerator, the KAT layout) it
times one forward + backward (gradients for x and both coefficient tensors) of

- ``fused``: the fused formulation, eager (``RationalCPUFunction`` with ``compile=False``);
- ``reference``: autograd through the pure-PyTorch formula (the eager choice for large tensors);
- ``compiled``: the fused formulation through ``torch.compile`` (compiled during warm-up, not timed);

interleaved round by round, medians of ``--repeats`` rounds, process CPU time (robust on a shared machine) and wall
time, one thread by default. The last column is best eager / compiled: above 1 compiling wins per call.

    python benchmarks/rational_cpu_threshold.py                 # 1 thread, C in 64 256 768
    python benchmarks/rational_cpu_threshold.py --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from _common import medians, time_interleaved

from hf_kan.ops.rational import rational_reference
from hf_kan.ops.rational.cpu import COMPILE_MIN_NUMEL, RationalCPUFunction

GROUPS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 256, 768])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128, 512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    numerator = torch.randn(1, 6, requires_grad=True)
    denominator = torch.randn(GROUPS, 4, requires_grad=True)

    def run(kind: str, x: torch.Tensor, grad: torch.Tensor):
        def call() -> None:
            leaf = x.detach().requires_grad_(True)
            if kind == "reference":
                out = rational_reference(leaf, numerator, denominator)
            else:
                out = RationalCPUFunction.apply(leaf, numerator, denominator, kind == "compiled")
            torch.autograd.grad(out, (leaf, numerator, denominator), grad)

        return call

    rows = []
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print(f"current COMPILE_MIN_NUMEL = {COMPILE_MIN_NUMEL:,}")
    print(f"{'shape':>14} {'numel':>10} {'fused us':>9} {'ref us':>9} {'compiled us':>12} {'eager/compiled':>15}")
    for channels in args.channels:
        for n_rows in args.rows:
            x = torch.randn(n_rows, channels)
            grad = torch.randn_like(x)
            fns = {kind: run(kind, x, grad) for kind in ("fused", "reference", "compiled")}
            times = time_interleaved(fns, args.repeats, warmup=3)
            cpu = {kind: medians(t)[1] for kind, t in times.items()}
            wall = {kind: medians(t)[0] for kind, t in times.items()}
            best_eager = min(cpu["fused"], cpu["reference"])
            row = {"rows": n_rows, "channels": channels, "numel": x.numel(), "cpu_s": cpu, "wall_s": wall,
                   "eager_over_compiled": best_eager / cpu["compiled"]}  # fmt: skip
            rows.append(row)
            print(
                f"{f'[{n_rows}, {channels}]':>14} {x.numel():>10,} {1e6 * cpu['fused']:>9.0f} "
                f"{1e6 * cpu['reference']:>9.0f} {1e6 * cpu['compiled']:>12.0f} {row['eager_over_compiled']:>15.2f}"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
