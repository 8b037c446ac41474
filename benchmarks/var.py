"""Prefill latency and peak memory of VAR (visual attention redistribution) on vs off, on a mid-size tiny LLaVA (CPU).

Variants, measured side by side in one run: ``sdpa`` (stock Transformers), ``hf_kan`` with every patch off, and
``hf_kan`` with VAR on its default layers (all but the first two and the last), where the backend computes explicit,
query-chunked probabilities. Random weights, LLaVA-shaped (CLIP tower + Llama decoder), 576 image tokens (336 px,
patch 14) and ``--text-tokens`` text tokens. A massive activation is planted in the BOS embedding (as LLaMA-2 has
one), the sink dimensions are found with ``find_sink_dims``, and ``--tau`` defaults to 5 because a hidden size of 512
caps ``|x_d / RMS(x)|`` near sqrt(512) = 22.6 (the paper's tau = 20 is meant for 4096-wide models).

Latency: median of ``--repeats`` interleaved prefills after warm-up; ratios to ``hf_kan`` off. Peak memory: the peak
of live CPU tensor memory allocated during one prefill (torch profiler allocation events), minus what was live before.

    python benchmarks/var.py                     # 8 layers, hidden 512, batch 1
    python benchmarks/var.py --batch 2 --json var.json
"""

from __future__ import annotations

import argparse
import statistics

import _common as bench
import torch
from torch.profiler import ProfilerActivity, profile

import hf_kan  # noqa: F401  (registers "hf_kan")
from hf_kan import patches


def build(args, variant: str):
    model = bench.tiny_llava(args.hidden, args.layers, bos_token_id=bench.BOS)
    with torch.no_grad():
        model.get_input_embeddings().weight[bench.BOS, 7] = 2.0  # a "massive activation" in dimension 7 of BOS
    if variant == "hf_kan":
        patches.apply(model, var=False)
    elif variant == "hf_kan+var":
        patches.apply(model, var={"tau": args.tau, "rho": args.rho})
    return model


def peak_bytes(model, x) -> int:
    """Peak of CPU tensor memory allocated (and not yet freed) during one forward, from profiler allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.inference_mode():
        model(**x)
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_llava_args(p)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tau", type=float, default=5.0)
    p.add_argument("--rho", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    variants = ["sdpa", "hf_kan", "hf_kan+var"]
    models = {v: build(args, v) for v in variants}
    x = bench.llava_inputs(args.batch, args.text_tokens, bos=True)
    var_cfg = patches.status(models["hf_kan+var"])["patches"]["var"]
    with torch.inference_mode():
        out = {v: models[v](**x).logits for v in variants}  # warm-up, and a check that VAR changed something
        timings = bench.time_interleaved({v: (lambda v=v: models[v](**x)) for v in variants}, args.repeats, warmup=0)
    times = {v: [wall for wall, _ in t] for v, t in timings.items()}
    changed = float((out["hf_kan+var"] - out["hf_kan"]).abs().max())
    peaks = {v: peak_bytes(models[v], x) for v in variants}
    base_t, base_m = statistics.median(times["hf_kan"]), peaks["hf_kan"]
    print(bench.llava_header(args))
    print(f"VAR: sink_dims {var_cfg['sink_dims']}, layers {var_cfg['layers']}, tau {var_cfg['tau']}, "
          f"rho {var_cfg['rho']}, p {var_cfg['p']}; max |logit change| from VAR = {changed:.3g}")
    print(f"{'variant':<12} {'prefill ms':>11} {'x off':>7} {'peak MiB':>9} {'x off':>7}")
    rows = []
    for v in variants:
        mt = statistics.median(times[v])
        rows.append({"variant": v, "prefill_s": mt, "prefill_ratio": mt / base_t, "peak_bytes": peaks[v],
                     "peak_ratio": peaks[v] / base_m})
        print(f"{v:<12} {mt * 1e3:>11.1f} {mt / base_t:>7.3f} {peaks[v] / 2**20:>9.1f} {peaks[v] / base_m:>7.3f}")
    bench.write_json(args.json, {"args": vars(args), "var": var_cfg, "results": rows})


if __name__ == "__main__":
    main()
