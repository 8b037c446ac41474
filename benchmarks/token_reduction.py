"""Visual-token pruning speed vs its FLOPs ratio, on a mid-size tiny LLaVA (CPU by default).

Side by side in one run: the unpatched model (``sdpa``), the ``hf_kan`` backend with every patch off (the same
bookkeeping as the pruned runs: separates backend overhead from pruning gains), and FastV pruning at layer K
(default 2) keeping 50% and 25% of the 576 image tokens. For each: the median prefill latency (one forward over
image + text tokens) and the median latency of a cached decode step (the pruned variants decode against their
shorter caches in layers >= K), next to the analytical decoder-FLOPs ratios (prefill and decode step) from
``patches.efficiency_report``. The goal: prefill speed-up within 15% of the FLOPs speed-up
(``speedup / flops_speedup >= 0.85``) and decode steps faster than unpatched.
Random weights; LLaVA-shaped (CLIP tower + Llama decoder), 336 px images with patch 14 -> 576 image tokens.

    python benchmarks/token_reduction.py                    # 8 layers, hidden 512, 64 text tokens, batch 1
    python benchmarks/token_reduction.py --json out.json
"""

from __future__ import annotations

import argparse

import _common as bench
import torch
from hf_kan.patches.engine.efficiency import layer_flops

import hf_kan  # noqa: F401  (registers "hf_kan")
from hf_kan import patches


def build(args, keep: float | None):
    model = bench.tiny_llava(args.hidden, args.layers)
    if keep is not None:
        patches.apply(model, prune=False if keep == 1.0 else {"layers": [args.k], "keep_ratios": [keep]})
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_llava_args(p)
    p.add_argument("--k", type=int, default=2, help="pruning layer K")
    bench.add_decode_timing_args(p)
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    variants = {"unpatched": None, "hf_kan off": 1.0, "keep 50%": 0.5, "keep 25%": 0.25}
    models = {v: build(args, keep) for v, keep in variants.items()}
    flops_model = models["hf_kan off"]  # every patch off: the unpatched model's accounting
    x = bench.llava_inputs(args.batch, args.text_tokens, padded=False)
    decode_reports = {}

    def record(v, out):
        if variants[v] is not None:
            decode_reports[v] = patches.efficiency_report(models[v], out.hf_kan_state)

    with torch.inference_mode():
        base_report = patches.efficiency_report(flops_model, flops_model(**x))
        reports = {v: (base_report if variants[v] is None else patches.efficiency_report(models[v], models[v](**x)))
                   for v in variants}
        prefill = bench.time_interleaved({v: (lambda v=v: models[v](**x)) for v in variants}, args.repeats)
        decode = bench.time_decode(models, x, args.decode_steps, on_step=record)
    print(f"{bench.llava_header(args, f'FastV K={args.k}')}; "
          f"medians of {args.repeats} prefills / {args.decode_steps} decode steps; speed-ups vs unpatched (sdpa)")
    print(f"{'variant':<10} {'prefill ms':>10} {'speedup':>8} {'cpu spd':>8} {'FLOPs spd':>9} {'spd/FLOPs':>9} "
          f"{'decode ms':>9} {'speedup':>8} {'cpu spd':>8} {'FLOPs spd':>9} {'KV MiB':>7}")
    # decode-step FLOPs of the unpatched model: every layer attends all prompt + generated keys
    n_keys = x["attention_mask"].shape[1] + args.decode_steps + 2
    cfg = models["unpatched"].config.text_config
    base_decode_flops = args.layers * layer_flops(cfg, torch.ones(args.batch),
                                                                     torch.full((args.batch,), n_keys))
    med = {v: {"prefill": bench.medians(prefill[v]), "decode": bench.medians(decode[v])} for v in variants}
    rows = []
    base = med["unpatched"]
    for v in variants:
        pf, dc = med[v]["prefill"], med[v]["decode"]
        flops_speedup = base_report.flops / reports[v].flops
        row = {"variant": v, "prefill_wall_s": pf[0], "prefill_cpu_s": pf[1], "decode_wall_s": dc[0],
               "decode_cpu_s": dc[1], "prefill_speedup": base["prefill"][0] / pf[0],
               "prefill_cpu_speedup": base["prefill"][1] / pf[1], "flops_speedup": flops_speedup,
               "decode_speedup": base["decode"][0] / dc[0], "decode_cpu_speedup": base["decode"][1] / dc[1],
               "kv_cache_bytes": reports[v].kv_cache_bytes, "tokens_per_layer": reports[v].tokens_per_layer}
        row["speedup_over_flops"] = row["prefill_speedup"] / flops_speedup
        dr = decode_reports.get(v)
        row["decode_flops_speedup"] = 1.0 if dr is None else base_decode_flops / dr.flops
        rows.append(row)
        print(f"{v:<10} {pf[0] * 1e3:>10.1f} {row['prefill_speedup']:>8.3f} {row['prefill_cpu_speedup']:>8.3f} "
              f"{flops_speedup:>9.3f} {row['speedup_over_flops']:>9.3f} {dc[0] * 1e3:>9.2f} "
              f"{row['decode_speedup']:>8.3f} {row['decode_cpu_speedup']:>8.3f} {row['decode_flops_speedup']:>9.3f} "
              f"{reports[v].kv_cache_bytes / 2**20:>7.2f}")
    bench.write_json(args.json, {"args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
