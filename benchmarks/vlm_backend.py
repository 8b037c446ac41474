"""Latency of the "hf_kan" attention backend vs "sdpa" on a mid-size tiny LLaVA (CPU by default).

Measures, side by side in one run, the prefill latency (one full forward over image + text tokens) and the latency
of a cached decode step, for: ``sdpa`` (the baseline a user would otherwise pick), ``hf_kan`` with every patch off,
and ``hf_kan`` with MMA on. Every round runs each variant once (prefills and decode steps interleaved), so load
changes on a shared machine hit the variants alike. Reports medians after warm-up, the ratios of the medians to
``sdpa`` and, more robust under load, the median of the per-round (paired) ratios. Random weights; the model is
LLaVA-shaped (CLIP tower + Llama decoder), 576 image tokens (336 px, patch 14) and ``--text-tokens`` text tokens.

    python benchmarks/vlm_backend.py                  # 8 layers, hidden 512, batch 1
    python benchmarks/vlm_backend.py --threads 1 --decode-steps 200 --json out.json
"""

from __future__ import annotations

import argparse
import statistics

import _common as bench
import torch

import hf_kan  # noqa: F401  (registers "hf_kan")
from hf_kan import patches


def build(args, attn: str):
    model = bench.tiny_llava(args.hidden, args.layers)
    if attn != "sdpa":
        patches.apply(model, mma={"assistant_token_ids": [bench.ASSISTANT]} if attn == "hf_kan+mma" else False)
    return model


def paired_ratio(times: list[tuple[float, float]], base: list[tuple[float, float]], i: int) -> float:
    """Median over rounds of ``times[r][i] / base[r][i]`` (``i``: 0 wall, 1 CPU)."""
    return statistics.median(t[i] / b[i] for t, b in zip(times, base))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_llava_args(p)
    bench.add_decode_timing_args(p)
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    variants = ["sdpa", "hf_kan", "hf_kan+mma"]
    models = {v: build(args, v) for v in variants}
    x = bench.llava_inputs(args.batch, args.text_tokens)
    with torch.inference_mode():
        prefill = bench.time_interleaved({v: (lambda v=v: models[v](**x)) for v in variants}, args.repeats)
        decode = bench.time_decode(models, x, args.decode_steps)  # decode steps interleaved across variants too
    rows = []
    print(f"{bench.llava_header(args)}; medians of {args.repeats} prefills / {args.decode_steps} decode steps; "
          "ratios to sdpa: of the medians, and the median of per-round paired ratios")
    print(f"{'variant':<12} {'prefill ms':>11} {'wall x':>7} {'cpu x':>7} {'paired':>7} {'decode ms':>10} "
          f"{'wall x':>7} {'cpu x':>7} {'paired':>7}")
    med = {v: {"prefill": bench.medians(prefill[v]), "decode": bench.medians(decode[v])} for v in variants}
    for v in variants:
        p, d, bp, bd = med[v]["prefill"], med[v]["decode"], med["sdpa"]["prefill"], med["sdpa"]["decode"]
        row = {"variant": v, "prefill_wall_s": p[0], "prefill_cpu_s": p[1], "decode_wall_s": d[0],
               "decode_cpu_s": d[1], "prefill_wall_ratio": p[0] / bp[0], "prefill_cpu_ratio": p[1] / bp[1],
               "decode_wall_ratio": d[0] / bd[0], "decode_cpu_ratio": d[1] / bd[1],
               "prefill_paired_wall_ratio": paired_ratio(prefill[v], prefill["sdpa"], 0),
               "decode_paired_wall_ratio": paired_ratio(decode[v], decode["sdpa"], 0),
               "decode_paired_cpu_ratio": paired_ratio(decode[v], decode["sdpa"], 1)}
        rows.append(row)
        print(f"{v:<12} {p[0] * 1e3:>11.1f} {row['prefill_wall_ratio']:>7.3f} {row['prefill_cpu_ratio']:>7.3f} "
              f"{row['prefill_paired_wall_ratio']:>7.3f} {d[0] * 1e3:>10.2f} {row['decode_wall_ratio']:>7.3f} "
              f"{row['decode_cpu_ratio']:>7.3f} {row['decode_paired_wall_ratio']:>7.3f}")
    bench.write_json(args.json, {"args": vars(args), "results": rows,
                                 "raw": {v: {"prefill": prefill[v], "decode": decode[v]} for v in variants}})


if __name__ == "__main__":
    main()
