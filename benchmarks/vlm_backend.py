"""Latency of the "hf_kan" attention backend vs "sdpa" on a mid-size tiny LLaVA (CPU by default).

Measures, side by side in one run, the prefill latency (one full forward over image + text tokens) and the latency
of a cached decode step, for: ``sdpa`` (the baseline a user would otherwise pick), ``hf_kan`` with every patch off,
and ``hf_kan`` with MMA on. Reports medians after warm-up and the ratios to ``sdpa``. Random weights; the model is
LLaVA-shaped (CLIP tower + Llama decoder), 576 image tokens (336 px, patch 14) and ``--text-tokens`` text tokens.

    python benchmarks/vlm_backend.py                  # 8 layers, hidden 512, batch 1
    python benchmarks/vlm_backend.py --batch 2 --json out.json
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


def build(args, attn: str):
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    if attn != "sdpa":
        patches.apply(model, mma={"assistant_token_ids": [ASSISTANT]} if attn == "hf_kan+mma" else False)
    return model


def inputs(args):
    g = torch.Generator().manual_seed(0)
    n_text = args.text_tokens
    before = n_text // 4
    rows = []
    for b in range(args.batch):
        pad = 7 * b  # later samples are shorter: left padding when batch > 1
        text = torch.randint(10, 1000, (n_text,), generator=g)
        ids = torch.cat([text[:before], torch.full((576,), IMAGE), text[before:-1], torch.tensor([ASSISTANT])])
        rows.append((pad, ids[pad:] if pad else ids))
    length = max(len(r) for _, r in rows)
    input_ids = torch.zeros(args.batch, length, dtype=torch.long)
    mask = torch.zeros(args.batch, length, dtype=torch.long)
    for b, (_, ids) in enumerate(rows):
        input_ids[b, length - len(ids):] = ids
        mask[b, length - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": mask,
            "pixel_values": torch.randn(args.batch, 3, 336, 336, generator=g)}


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time is the robust number on a shared machine."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["sdpa", "hf_kan", "hf_kan+mma"]
    models = {v: build(args, v) for v in variants}
    x = inputs(args)
    prefill = {v: [] for v in variants}
    decode = {v: [] for v in variants}
    with torch.inference_mode():
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
        for step in range(args.decode_steps + 2):  # decode steps interleaved across variants too
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
    rows = []
    print(f"LLaVA-shaped: {args.layers} layers, hidden {args.hidden}, 576 image + {args.text_tokens} text tokens, "
          f"batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
          f"{args.repeats} prefills / {args.decode_steps} decode steps; ratios to sdpa")
    print(f"{'variant':<12} {'prefill ms':>11} {'wall x':>7} {'cpu x':>7} {'decode ms':>10} {'wall x':>7} {'cpu x':>7}")
    med = {v: {k: [statistics.median(t[i] for t in d[v]) for i in (0, 1)] for k, d in
               (("prefill", prefill), ("decode", decode))} for v in variants}
    for v in variants:
        p, d, bp, bd = med[v]["prefill"], med[v]["decode"], med["sdpa"]["prefill"], med["sdpa"]["decode"]
        row = {"variant": v, "prefill_wall_s": p[0], "prefill_cpu_s": p[1], "decode_wall_s": d[0],
               "decode_cpu_s": d[1], "prefill_wall_ratio": p[0] / bp[0], "prefill_cpu_ratio": p[1] / bp[1],
               "decode_wall_ratio": d[0] / bd[0], "decode_cpu_ratio": d[1] / bd[1]}
        rows.append(row)
        print(f"{v:<12} {p[0] * 1e3:>11.1f} {row['prefill_wall_ratio']:>7.3f} {row['prefill_cpu_ratio']:>7.3f} "
              f"{d[0] * 1e3:>10.2f} {row['decode_wall_ratio']:>7.3f} {row['decode_cpu_ratio']:>7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
