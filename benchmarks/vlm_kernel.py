"""Whole-model latency and memory of the hf_kan backend's fused Triton path vs its SDPA path vs stock "sdpa" (GPU).

A LLaVA-shaped model with random weights (``_common.tiny_llava``: 576 image tokens, ``--text-tokens`` text tokens,
a Llama decoder of ``--layers`` layers, ``--hidden / 64`` heads of 64), for each patch set (every patch off; MMA;
MMA + VAR + FastV, whose scorer reads the kernel's log-sum-exp), in ``--dtype``:

- ``sdpa``: stock Transformers ``"sdpa"`` (no hf_kan), the baseline a user would otherwise pick (patch set "off" only);
- ``hf_kan/sdpa``: ``HF_KAN_ATTENTION_BACKEND=sdpa``: the ``(B, 1, T, S)`` metadata mask and torch's SDPA, VAR layers
  on explicit probabilities, pruning scores recomputed;
- ``hf_kan/triton``: ``HF_KAN_ATTENTION_BACKEND=triton``: the fused kernel reading per-token metadata, VAR inside
  the kernel, pruning scores from ``attention_taps``.

Reports, per variant: median prefill latency (one forward over the whole prompt, interleaved A B A B across variants,
CUDA-synchronised), median cached decode-step latency (steps interleaved too), peak allocated memory of a prefill, and
the largest logit difference of the prefill between the two hf_kan paths (the same model, relative to the logits'
scale). Ratios are to ``hf_kan/sdpa`` of the same patch set.

    python benchmarks/vlm_kernel.py                                    # CUDA, bf16, 8 layers, hidden 2048
    python benchmarks/vlm_kernel.py --text-tokens 3000 --json out.json # a 3.6k-token prompt
    TRITON_INTERPRET=1 python benchmarks/vlm_kernel.py --device cpu --dtype float32 --dry-run   # checks the script
"""

from __future__ import annotations

import argparse
import os
import statistics

import _common as bench
import torch

import hf_kan  # noqa: F401  (registers "hf_kan")
from hf_kan import patches
from hf_kan.ops.attention import BACKEND_ENV_VAR

PATCH_SETS = {
    "off": {},
    "mma": {"mma": {"assistant_token_ids": [bench.ASSISTANT]}},
    "mma+var+fastv": {"mma": {"assistant_token_ids": [bench.ASSISTANT]},
                      "var": {"sink_dims": [3, 17], "tau": 1.5},
                      "prune": {"layers": [2], "keep_ratios": [0.5]}},
}


class OnBackend:
    """Calls ``model`` with ``HF_KAN_ATTENTION_BACKEND`` set to ``backend`` (read at each forward) and waits for the
    device, so wall-clock timers see the whole call."""

    def __init__(self, model, backend: str | None):
        self.model, self.backend = model, backend

    def __call__(self, **inputs):
        if self.backend is not None:
            os.environ[BACKEND_ENV_VAR] = self.backend
        out = self.model(**inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out


def peak_memory(fn, device) -> float | None:
    """Peak allocated bytes (MiB) during ``fn()`` on CUDA; ``None`` elsewhere."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_llava_args(p)
    bench.add_decode_timing_args(p)
    p.set_defaults(hidden=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--patch-sets", nargs="+", default=list(PATCH_SETS), choices=list(PATCH_SETS))
    p.add_argument("--dry-run", action="store_true",
                   help="4 layers, hidden 128, 8 text tokens, 1 repeat, 1 decode step (on CPU under "
                        "TRITON_INTERPRET=1: 256-wide interpreter tiles): checks the script runs")
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.dry_run:
        args.layers, args.hidden, args.text_tokens, args.repeats, args.decode_steps = 4, 128, 8, 1, 1
        if device.type == "cpu":  # Triton's interpreter: few, large tiles (it runs each program in Python)
            from hf_kan.ops.attention import triton as kernels

            kernels._fwd_config = lambda *a: (256, 256, 1, 1)
    x = {k: v.to(device) for k, v in bench.llava_inputs(args.batch, args.text_tokens, bos=True).items()}
    x["pixel_values"] = x["pixel_values"].to(dtype)

    def build(patch_set: str | None):
        model = bench.tiny_llava(args.hidden, args.layers).to(device=device, dtype=dtype)
        if patch_set is not None:
            patches.apply(model, **PATCH_SETS[patch_set])
        return model

    previous = os.environ.get(BACKEND_ENV_VAR)
    variants = {"sdpa": OnBackend(build(None), None)}
    for name in args.patch_sets:
        model = build(name)
        variants[f"{name} hf_kan/sdpa"] = OnBackend(model, "sdpa")
        variants[f"{name} hf_kan/triton"] = OnBackend(model, "triton")
    rows = []
    try:
        with torch.inference_mode():
            diffs = {}
            for name in args.patch_sets:
                ref = variants[f"{name} hf_kan/sdpa"](**x).logits.float()
                out = variants[f"{name} hf_kan/triton"](**x).logits.float()
                diffs[name] = ((out - ref).abs().max() / ref.abs().max()).item() if out.shape == ref.shape else None
            memory = {v: peak_memory(lambda fn=fn: fn(**x), device) for v, fn in variants.items()}
            prefill = bench.time_interleaved({v: (lambda fn=fn: fn(**x)) for v, fn in variants.items()}, args.repeats)
            decode = bench.time_decode(variants, x, args.decode_steps)
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV_VAR, None)
        else:
            os.environ[BACKEND_ENV_VAR] = previous
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = bench.llava_header(args, f"{args.dtype} on {device_name}")
    print(f"{header}; medians of {args.repeats} prefills / {args.decode_steps} decode steps; x: ratio to hf_kan/sdpa "
          "of the same patch set")
    print(f"{'variant':<28} {'prefill ms':>11} {'x':>6} {'decode ms':>10} {'x':>6} {'peak MiB':>9} "
          f"{'max |dlogit|':>13}")
    for v in variants:
        base = v.replace("hf_kan/triton", "hf_kan/sdpa")
        p_ms = statistics.median(t[0] for t in prefill[v]) * 1e3
        d_ms = statistics.median(t[0] for t in decode[v]) * 1e3
        p_base = statistics.median(t[0] for t in prefill[base]) * 1e3
        d_base = statistics.median(t[0] for t in decode[base]) * 1e3
        diff = diffs.get(v.split()[0]) if v.endswith("triton") else None
        row = {"variant": v, "prefill_ms": p_ms, "prefill_ratio": p_ms / p_base, "decode_ms": d_ms,
               "decode_ratio": d_ms / d_base, "peak_mib": memory[v], "relative_max_logit_diff": diff}
        rows.append(row)
        mem = "-" if memory[v] is None else f"{memory[v]:.0f}"
        dl = "" if diff is None else f"{diff:.1e}"
        print(f"{v:<28} {p_ms:>11.2f} {p_ms / p_base:>6.2f} {d_ms:>10.2f} {d_ms / d_base:>6.2f} {mem:>9} {dl:>13}")
    bench.write_json(args.json, {"args": vars(args), "device": device_name, "torch": torch.__version__,
                                 "rows": rows})


if __name__ == "__main__":
    main()
