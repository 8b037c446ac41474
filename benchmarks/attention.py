"""Metadata-masked attention: the hf_kan Triton kernel vs SDPA (flash / efficient) and eager, 1k to 16k tokens.

Usage::

    python benchmarks/attention.py                          # CUDA: bf16, 32 heads (8 KV heads), head dim 128
    python benchmarks/attention.py --lengths 1024 4096 --json attention.json
    python benchmarks/attention.py --sweep                  # time alternative launch configurations at 4k tokens
    python benchmarks/attention.py --device cpu             # no timings: a tiny interpreter correctness smoke check

Cases, on a LLaVA-like prompt of L tokens (35 text tokens, L/2 image tokens, then text ending in the assistant
opener, which image tokens see under MMA; sinks: the first token and every 97th image token; batch ``--batch``):

- ``causal``: plain causal attention. Providers: ``hf_kan`` (the kernel, from position metadata), ``sdpa-flash``
  (``is_causal=True`` on the flash backend: the speed target), ``sdpa-mask`` (the materialised ``(B, 1, T, S)``
  bool mask on the efficient backend: what the hf_kan SDPA path runs today), ``eager`` (explicit fp32 softmax,
  what FastV's and VAR's released code require).
- ``mma``: modality-mutual attention (image queries also see the prompt text after them): ``hf_kan``,
  ``sdpa-mask``, ``eager`` (flash cannot express the mask; its causal time is the reference line).
- ``mma+var+taps``: MMA, VAR on the text queries after the image, and the FastV + text-mean score taps from the
  saved log-sum-exp: ``hf_kan`` vs ``eager`` (probabilities, ``var_redistribute``, head-averaged rows).
- ``decode``: one query against an L-token cache: ``hf_kan``, ``sdpa-flash``, ``eager``.

Modes: ``fwd`` (no graph) and ``fwd+bwd`` (gradients of q, k, v; mask-only cases). SDPA and eager get K/V already
expanded to all heads (the expansion is not timed). Each number is the median of ``--repeats`` CUDA-event timings
after warm-up, providers interleaved run by run. Columns: ``ms``; ``TFLOP/s`` of useful work (4 B H V D flops for
the forward, 2.5x that for the backward, V = visible (query, key) pairs); ``%peak``: that over a bf16 matrix product
measured in the same run; ``MB``: peak memory allocated above the inputs; ``x flash``: time over ``sdpa-flash``
causal at the same length and mode.

GPU-only: on CPU the script says so and runs a tiny correctness smoke check under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hf_kan.ops.attention import VARSpec, attention_taps, masked_attention, var_redistribute, visibility_mask

TEXT_PREFIX = 35  # text tokens before the image


def prompt_metadata(length: int, device) -> dict:
    """Per-token metadata of the LLaVA-like prompt (batch 1; broadcast over the batch)."""
    pos = torch.arange(length, device=device)[None]
    n_img = length // 2
    image = (pos >= TEXT_PREFIX) & (pos < TEXT_PREFIX + n_img)
    return dict(
        pos=pos,
        image=image,
        span=torch.where(image, torch.full_like(pos, length - 1), pos),
        text=~image,
        sink=(pos == 0) | (image & (pos % 97 == 0)),
        query=pos >= TEXT_PREFIX + n_img,
    )


def visible_pairs(meta: dict, mma: bool, t: int) -> int:
    q = slice(meta["pos"].shape[1] - t, None)
    extra = dict(q_span_end=meta["span"][:, q], k_text=meta["text"]) if mma else {}
    return int(visibility_mask(meta["pos"][:, q], meta["pos"], **extra).sum())


def _eager(q, k, v, allowed, scale, var=None, rows=None):
    """Explicit attention as Transformers' eager path computes it (fp32 softmax), optionally with VAR and taps."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, -1)
    taps = None
    if rows is not None:
        taps = [probs[:, :, r].mean(1).mean(1) for r in rows]
    if var is not None:
        probs, _ = var_redistribute(probs, var.sink[:, None, None], var.image[:, None, None], var.query[:, None],
                                    var.p, var.rho, var.min_image_attention)
    return torch.matmul(probs.to(v.dtype), v), taps


def make_runner(case: str, provider: str, mode: str, q, k, v, k_full, v_full, meta, scale):
    """A closure running one unit of work, or None when the provider does not apply."""
    t = q.shape[2]
    qs = slice(meta["pos"].shape[1] - t, None)
    mma = case in ("mma", "mma+var+taps")
    kw = dict(q_pos=meta["pos"][:, qs], k_pos=meta["pos"])
    if mma:
        kw.update(q_span_end=meta["span"][:, qs], k_text=meta["text"])
    var = None
    if case == "mma+var+taps":
        var = VARSpec(sink=meta["sink"], image=meta["image"], query=meta["query"][:, qs], p=0.6, rho=0.5,
                      min_image_attention=0.2)
    text_rows = torch.nonzero(meta["query"][0, qs]).flatten()
    tap_rows = (torch.tensor([t - 1], device=q.device), text_rows)
    grad = mode == "fwd+bwd"
    if grad and (var is not None or case == "decode"):  # no kernel backward through VAR; decode is inference
        return None
    allowed = None
    if provider in ("sdpa-mask", "eager") and case != "decode":
        allowed = visibility_mask(kw["q_pos"], kw["k_pos"], q_span_end=kw.get("q_span_end"), k_text=kw.get("k_text"))

    def wrap(fwd, inputs):
        if not grad:
            def run():
                with torch.no_grad():
                    fwd(*inputs)
            return run
        grad_out = torch.randn_like(q)

        def run():
            leaves = [x.detach().requires_grad_(True) for x in inputs]
            fwd(*leaves).backward(grad_out)
        return run

    if provider == "hf_kan":  # the kernel reads the grouped K/V in place
        def fwd(qq, kk, vv):
            if var is None:
                return masked_attention(qq, kk, vv, scale=scale, backend="triton", **kw)
            res = masked_attention(qq, kk, vv, scale=scale, var=var, return_lse=True, backend="triton", **kw)
            for r in tap_rows:
                w = torch.full((qq.shape[0], r.numel()), 1.0 / max(r.numel(), 1), device=qq.device)
                rkw = dict(kw, q_pos=kw["q_pos"][:, r], q_span_end=kw["q_span_end"][:, r])
                attention_taps(qq[:, :, r], kk, w, lse=res.lse[:, :, r], scale=scale, backend="triton", **rkw)
            return res.out
        return wrap(fwd, (q, k, v))
    if provider == "sdpa-flash":
        if case not in ("causal", "decode"):
            return None
        backend = torch.nn.attention.SDPBackend.FLASH_ATTENTION

        def fwd(qq, kk, vv):
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=case == "causal", scale=scale)
        return wrap(fwd, (q, k_full, v_full))
    if provider == "sdpa-mask":
        if case == "decode" or var is not None:
            return None
        backend = torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION

        def fwd(qq, kk, vv):
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed[:, None], scale=scale)
        return wrap(fwd, (q, k_full, v_full))
    if provider == "eager":
        def fwd(qq, kk, vv):
            return _eager(qq, kk, vv, allowed, scale, var, tap_rows if var is not None else None)[0]
        return wrap(fwd, (q, k_full, v_full))
    raise ValueError(provider)


def time_runs(fns: dict, repeats: int, warmup: int) -> dict:
    """Median milliseconds per name (CUDA events; wall clock without CUDA), runs interleaved; 'oom' / error text
    where a run failed."""
    cuda = torch.cuda.is_available()
    out: dict = {}
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            if cuda:
                torch.cuda.synchronize()
            live[name] = []
        except torch.cuda.OutOfMemoryError:
            out[name] = "oom"
            torch.cuda.empty_cache()
        except Exception as e:  # e.g. no SDPA kernel for these inputs here, a Triton resource error: report, go on
            out[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"
    for _ in range(repeats):
        for name in list(live):
            if not cuda:
                t0 = time.perf_counter()
                fns[name]()
                live[name].append((time.perf_counter() - t0) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            end.synchronize()
            live[name].append(start.elapsed_time(end))
    out.update({name: statistics.median(ts) for name, ts in live.items()})
    return out


def peak_memory_mb(fn) -> float | str | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        fn()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_peak_tflops(dtype) -> float:
    """bf16/fp16 matrix-product throughput measured here: an 8192^3 product, median of 10 after 3 warm-ups."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = time_runs({"mm": lambda: a @ b}, repeats=10, warmup=3)["mm"]
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


CASES = ("causal", "mma", "mma+var+taps", "decode")
PROVIDERS = ("hf_kan", "sdpa-flash", "sdpa-mask", "eager")


def bench(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    dev = args.device
    peak = matmul_peak_tflops(dtype) if dev == "cuda" else None
    if peak:
        print(f"# measured {args.dtype} matrix-product peak: {peak:.0f} TFLOP/s (8192^3)")
    rows = []
    print(f"{'case':<14}{'mode':<9}{'L':>6}  {'provider':<11}{'ms':>9}{'TFLOP/s':>9}{'%peak':>7}{'MB':>10}"
          f"{'x flash':>9}")
    for length in args.lengths:
        meta = prompt_metadata(length, dev)
        scale = args.head_dim**-0.5
        g = args.heads // args.kv_heads
        for case in args.cases:
            t = 1 if case == "decode" else length
            q = torch.randn(args.batch, args.heads, t, args.head_dim, device=dev, dtype=dtype)
            k = torch.randn(args.batch, args.kv_heads, length, args.head_dim, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            k_full, v_full = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            pairs = args.batch * visible_pairs(meta, case != "causal" and case != "decode", t)
            for mode in args.modes:
                fns = {}
                for p in args.providers:
                    fn = make_runner(case, p, mode, q, k, v, k_full, v_full, meta, scale)
                    if fn is not None:
                        fns[p] = fn
                if not fns:
                    continue
                times = time_runs(fns, args.repeats, args.warmup)
                flops = 4 * args.heads * pairs * args.head_dim * (3.5 if mode == "fwd+bwd" else 1.0)
                for p, fn in fns.items():
                    ms = times[p]
                    row = dict(case=case, mode=mode, length=length, provider=p, ms=ms, batch=args.batch,
                               heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype)
                    row["peak_mb"] = peak_memory_mb(fn) if isinstance(ms, float) else None
                    if isinstance(ms, float):
                        row["tflops"] = flops / (ms * 1e-3) / 1e12
                        row["fraction_of_peak"] = row["tflops"] / peak if peak else None
                    rows.append(row)
        # ratios against sdpa-flash causal at the same length and mode
        for row in rows:
            if row["length"] != length:
                continue
            ref = next((r for r in rows if r["length"] == length and r["provider"] == "sdpa-flash"
                        and r["mode"] == row["mode"] and r["case"] == ("decode" if row["case"] == "decode"
                                                                         else "causal")), None)
            if ref and isinstance(ref["ms"], float) and isinstance(row["ms"], float):
                row["x_flash"] = row["ms"] / ref["ms"]
            print(_fmt(row))
        del q, k, v, k_full, v_full
        if dev == "cuda":
            torch.cuda.empty_cache()
        _dump(args, rows)
    return rows


def _dump(args, rows: list[dict]) -> None:
    """Write the rows so far (a part stopped at its time limit still leaves its finished rows behind)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


def _fmt(row: dict) -> str:
    def num(key, spec):
        value = row.get(key)
        return format(value, spec) if isinstance(value, float) else format(str(value or "-"), ">" + spec.split(".")[0])

    return (f"{row['case']:<14}{row['mode']:<9}{row['length']:>6}  {row['provider']:<11}{num('ms', '9.3f')}"
            f"{num('tflops', '9.1f')}{num('fraction_of_peak', '7.1%')}{num('peak_mb', '10.0f')}"
            f"{num('x_flash', '9.2f')}")


def sweep(args) -> list[dict]:
    """Time the kernels' alternative launch configurations at one length (forward, forward with VAR, backward)."""
    from hf_kan.ops.attention import triton as at

    dtype, dev = getattr(torch, args.dtype), args.device
    length = args.sweep_length
    meta = prompt_metadata(length, dev)
    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(b, h, length, d, device=dev, dtype=dtype)
    k = torch.randn(b, hkv, length, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    q_meta = at.pack_query_meta(meta["pos"], meta["span"], meta["query"], b)
    k_meta = at.pack_key_meta(meta["pos"], None, meta["text"], meta["image"], meta["sink"], b)
    scale = d**-0.5
    out, lse, _ = at.attention_forward(q, k, v, q_meta, k_meta, scale=scale, has_mma=True)
    grad_out = torch.randn_like(out)
    configs = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))
    if args.dry_run:
        configs = configs[:2]
    rows = []
    for kind in ("fwd", "fwd+var", "bwd"):
        fns = {}
        for bm, bn, w, st in configs:
            if kind == "fwd+var" and bm > 64 and bn > 64:
                continue
            cfg = (bm, bn, w, st)
            if kind == "bwd":
                fn = lambda cfg=cfg: at.attention_backward(grad_out, q, k, v, out, lse, q_meta, k_meta, scale=scale,  # noqa: E731
                                                           has_mma=True, config=cfg)
            else:
                var = (0.6, 0.5, 0.2) if kind == "fwd+var" else None
                fn = lambda cfg=cfg, var=var: at.attention_forward(q, k, v, q_meta, k_meta, scale=scale,  # noqa: E731
                                                                   has_mma=True, var=var, config=cfg)
            try:
                fn()
                fns[cfg] = fn
            except Exception as e:  # out of shared memory / registers for this configuration
                rows.append(dict(kind=kind, config=cfg, error=type(e).__name__))
        times = time_runs(fns, args.repeats, args.warmup)
        default = (at._fwd_config(d, length, kind == "fwd+var", False) if kind != "bwd" else at._bwd_config(d, False))
        timed = {c: ms for c, ms in times.items() if isinstance(ms, float)}
        if not timed:
            print(f"# sweep {kind}: no configuration ran")
            continue
        best = min(timed, key=timed.get)
        for cfg, ms in sorted(times.items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else 1e9):
            rows.append(dict(kind=kind, config=cfg, ms=ms, default=cfg == default))
        print(f"# sweep {kind} L={length}: best {best} {times[best]:.3f} ms; default {default} "
              f"{times.get(default, float('nan')):.3f} ms")
        _dump(args, rows)
    return rows


def cpu_smoke() -> int:
    """No GPU: check the kernel once against the reference under the interpreter, no timings."""
    os.environ["TRITON_INTERPRET"] = "1"
    from hf_kan.ops.attention import masked_attention_reference

    meta = prompt_metadata(40, "cpu")
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 32)
    kw = dict(q_pos=meta["pos"], k_pos=meta["pos"], q_span_end=meta["span"], k_text=meta["text"])
    var = VARSpec(sink=meta["sink"], image=meta["image"], query=meta["query"], p=0.6, rho=0.5)
    got = masked_attention(q, k, v, var=var, backend="triton", **kw)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), var=var, **kw).out
    err = ((got.double() - ref).norm() / ref.norm()).item()
    print(f"CPU interpreter smoke check (L=40, MMA + VAR): relative error {err:.1e}")
    return 0 if err < 1e-5 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="time alternative launch configurations instead")
    parser.add_argument("--sweep-length", type=int, default=4096)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: run every case and provider once on tiny shapes under the Triton interpreter "
                             "(checks the script; the numbers are not timings)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.device, args.dtype, args.repeats, args.warmup = "cpu", "float32", 1, 1
        args.lengths, args.batch, args.heads, args.kv_heads, args.head_dim = [48, 80], 1, 2, 1, 32
        args.sweep_length = 64
        print("# DRY RUN on CPU under the Triton interpreter: milliseconds below are NOT timings")
    elif args.device == "cpu" or not torch.cuda.is_available():
        print("benchmarks/attention.py times CUDA kernels only; no CUDA device here, so no timings. "
              "Running the CPU interpreter smoke check instead.")
        return cpu_smoke()
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    import triton

    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU interpreter"
    print(f"# {card} torch {torch.__version__} triton {triton.__version__} python {platform.python_version()} "
          f"batch={args.batch} heads={args.heads}/{args.kv_heads} head_dim={args.head_dim} dtype={args.dtype} "
          f"repeats={args.repeats}")
    if args.sweep:
        sweep(args)
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
