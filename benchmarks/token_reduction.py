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
import json
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import hf_kan  # noqa: F401  (registers "hf_kan")
from hf_kan import patches

IMAGE, ASSISTANT = 5, 4


def build(args, keep: float | None):
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    if keep is not None:
        patches.apply(model, prune=False if keep == 1.0 else {"layers": [args.k], "keep_ratios": [keep]})
    return model


def inputs(args):
    g = torch.Generator().manual_seed(0)
    n_text = args.text_tokens
    before = n_text // 4
    text = torch.randint(10, 1000, (n_text,), generator=g)
    ids = torch.cat([text[:before], torch.full((576,), IMAGE), text[before:-1], torch.tensor([ASSISTANT])])
    ids = ids[None].expand(args.batch, -1).clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(args.batch, 3, 336, 336, generator=g)}


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--k", type=int, default=2, help="pruning layer K")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {"unpatched": None, "hf_kan off": 1.0, "keep 50%": 0.5, "keep 25%": 0.25}
    models = {v: build(args, keep) for v, keep in variants.items()}
    flops_model = models["hf_kan off"]  # every patch off: the unpatched model's accounting
    x = inputs(args)
    prefill = {v: [] for v in variants}
    decode = {v: [] for v in variants}
    with torch.inference_mode():
        base_report = patches.efficiency_report(flops_model, flops_model(**x))
        reports = {v: (base_report if variants[v] is None else patches.efficiency_report(models[v], models[v](**x)))
                   for v in variants}
        for v in variants:  # warm-up
            models[v](**x)
        for _ in range(args.repeats):  # interleaved so load changes hit every variant alike
            for v in variants:
                prefill[v].append(timed(lambda v=v: models[v](**x)))
        state = {}
        for v in variants:
            out = models[v](**x)
            state[v] = [out.cache, x["attention_mask"], out.logits[:, -1:].argmax(-1)]
        pos = x["attention_mask"].sum(-1, keepdim=True)
        decode_reports = {}
        for step in range(args.decode_steps + 2):
            for v in variants:
                cache, mask, token = state[v]
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                box = {}

                def run(v=v, cache=cache, mask=mask, token=token, box=box, step=step):
                    box["out"] = models[v](input_ids=token, attention_mask=mask, cache=cache, position_ids=pos + step)

                t = timed(run)
                if step >= 2:
                    decode[v].append(t)
                state[v] = [box["out"].cache, mask, box["out"].logits[:, -1:].argmax(-1)]
                if variants[v] is not None:
                    decode_reports[v] = patches.efficiency_report(models[v], box["out"].hf_kan_state)
    print(f"LLaVA-shaped: {args.layers} layers, hidden {args.hidden}, 576 image + {args.text_tokens} text tokens, "
          f"batch {args.batch}, FastV K={args.k}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"medians of {args.repeats} prefills / {args.decode_steps} decode steps; speed-ups vs unpatched (sdpa)")
    print(f"{'variant':<10} {'prefill ms':>10} {'speedup':>8} {'cpu spd':>8} {'FLOPs spd':>9} {'spd/FLOPs':>9} "
          f"{'decode ms':>9} {'speedup':>8} {'cpu spd':>8} {'FLOPs spd':>9} {'KV MiB':>7}")
    # decode-step FLOPs of the unpatched model: every layer attends all prompt + generated keys
    n_keys = x["attention_mask"].shape[1] + args.decode_steps + 2
    cfg = models["unpatched"].config.text_config
    base_decode_flops = args.layers * patches.efficiency.layer_flops(cfg, torch.ones(args.batch),
                                                                     torch.full((args.batch,), n_keys))
    med = {v: {k: [statistics.median(t[i] for t in d[v]) for i in (0, 1)] for k, d in
               (("prefill", prefill), ("decode", decode))} for v in variants}
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
