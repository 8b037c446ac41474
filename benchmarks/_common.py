"""Helpers shared by the benchmarks: a (wall, CPU) timer, interleaved timing loops with warm-up, medians, thread
and JSON handling (also used by ``moh.py``), and the mid-size tiny LLaVA (random weights), its inputs, CLI options,
table header and cached-decode timing loop used by ``token_reduction.py``, ``var.py`` and ``vlm_backend.py``.

The benchmarks import this as ``import _common as bench`` (or ``from _common import ...``): running
``python benchmarks/<name>.py`` puts ``benchmarks/`` first on ``sys.path``. Not part of the ``hf_kan`` package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE, ASSISTANT, BOS = 5, 4, 1  # token ids of the tiny LLaVA: image placeholder, end of user turn, BOS
N_IMAGE_TOKENS = 576  # 336 px images, patch 14: (336 / 14)^2


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time is the robust number on a shared machine."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def time_interleaved(fns: Mapping[str, Callable[[], object]], repeats: int,
                     warmup: int = 1) -> dict[str, list[tuple[float, float]]]:
    """Per name, ``repeats`` (wall, CPU) timings of its function after ``warmup`` untimed rounds. Each round calls
    every function once, in order, so load changes on a shared machine hit every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def medians(times: list[tuple[float, float]]) -> list[float]:
    """[median wall seconds, median CPU seconds] of (wall, CPU) timings."""
    return [statistics.median(t[i] for t in times) for i in (0, 1)]


def add_llava_args(p: argparse.ArgumentParser) -> None:
    """The tiny LLaVA's size options (defaults: 8 layers, hidden 512, 64 text tokens, batch 1)."""
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)


def add_decode_timing_args(p: argparse.ArgumentParser) -> None:
    """Options of the prefill + decode benchmarks: ``--repeats`` (7 prefills), ``--decode-steps`` (20),
    ``--threads`` and ``--json``."""
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (non-zero); otherwise keep torch's default."""
    if threads:
        torch.set_num_threads(threads)


def write_json(path: str | None, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` when one is given."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


def tiny_llava(hidden: int, layers: int, **text_kwargs) -> LlavaForConditionalGeneration:
    """LLaVA-shaped model with random weights (seed 0), ``sdpa`` attention, in eval mode: a one-layer 64-wide CLIP
    tower (336 px, patch 14 -> 576 image tokens) and a Llama decoder with ``hidden // 64`` heads of 64, MLP width
    ``hidden * 11 // 4``, vocabulary 1000; ``text_kwargs`` go to the ``LlamaConfig``."""
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64,
                       num_key_value_heads=hidden // 64, max_position_embeddings=4096, **text_kwargs)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()


def llava_inputs(batch: int, text_tokens: int, *, padded: bool = True, bos: bool = False) -> dict[str, torch.Tensor]:
    """Inputs for ``tiny_llava`` (generator seed 0): per sample, random text ids in [10, 1000) with the 576 image
    tokens after the first ``text_tokens // 4`` of them, ending in ``ASSISTANT``; ``text_tokens + 576`` ids in all.

    ``padded``: every sample draws its own text and sample ``b`` is ``7 * b`` ids shorter (cut at the front) and
    left-padded; otherwise one sample is repeated ``batch`` times. ``bos``: the ids start with ``BOS`` (then
    ``text_tokens - 2`` random text ids). Random ``pixel_values`` of shape (batch, 3, 336, 336) follow.
    """
    g = torch.Generator().manual_seed(0)
    before = text_tokens // 4
    rows = []
    for b in range(batch if padded else 1):
        pad = 7 * b
        if bos:
            text = torch.randint(10, 1000, (text_tokens - 2,), generator=g)
            ids = torch.cat([torch.tensor([BOS]), text[:before], torch.full((N_IMAGE_TOKENS,), IMAGE), text[before:],
                             torch.tensor([ASSISTANT])])
        else:
            text = torch.randint(10, 1000, (text_tokens,), generator=g)
            ids = torch.cat([text[:before], torch.full((N_IMAGE_TOKENS,), IMAGE), text[before:-1],
                             torch.tensor([ASSISTANT])])
        rows.append(ids[pad:] if pad else ids)
    if not padded:
        rows = rows * batch
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids):] = ids
        mask[b, length - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": mask,
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=g)}


def llava_header(args: argparse.Namespace, extra: str = "") -> str:
    """First line of a tiny-LLaVA table: model size, token counts, batch, ``extra`` (if any), torch and threads."""
    extra = f"{extra}, " if extra else ""
    return (f"LLaVA-shaped: {args.layers} layers, hidden {args.hidden}, {N_IMAGE_TOKENS} image + {args.text_tokens} "
            f"text tokens, batch {args.batch}, {extra}torch {torch.__version__}, {torch.get_num_threads()} threads")


def time_decode(models: Mapping[str, torch.nn.Module], x: dict[str, torch.Tensor], steps: int,
                on_step: Callable[[str, object], None] | None = None) -> dict[str, list[tuple[float, float]]]:
    """Per model, (wall, CPU) timings of ``steps`` greedy cached decode steps after a prefill of ``x``; two more
    steps run first, untimed, as warm-up. Steps are interleaved across models. ``on_step(name, output)`` is called
    after every step (warm-up included)."""
    state = {}
    for v, model in models.items():
        out = model(**x)
        state[v] = [out.cache, x["attention_mask"], out.logits[:, -1:].argmax(-1)]
    pos = x["attention_mask"].sum(-1, keepdim=True)
    decode: dict[str, list[tuple[float, float]]] = {v: [] for v in models}
    for step in range(steps + 2):
        for v, model in models.items():
            cache, mask, token = state[v]
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            box = {}

            def run(model=model, cache=cache, mask=mask, token=token, box=box, step=step):
                box["out"] = model(input_ids=token, attention_mask=mask, cache=cache, position_ids=pos + step)

            t = timed(run)
            if step >= 2:
                decode[v].append(t)
            state[v] = [box["out"].cache, mask, box["out"].logits[:, -1:].argmax(-1)]
            if on_step is not None:
                on_step(v, box["out"])
    return decode
