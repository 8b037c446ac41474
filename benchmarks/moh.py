"""CPU latency of Mixture-of-Head attention (75 % of heads active per token) vs the same base model, side by side.

Two modes:

``decode`` (default): one cached decode step at ``--contexts`` cached tokens (default 1k, 4k, 16k) of a
Llama-shaped model (random weights; by default plain multi-head attention, 16 heads of 128). Two measurements:

- attention alone: layer 0's attention on (B, H, 1, D) queries and (B, H_kv, S, D) cached keys/values, as the base
  model runs it (Transformers' ``sdpa`` attention function) vs MoH's skipping path
  (``hf_kan.moh.skip.skipped_head_attention``, planning included) with the active heads the MoH model's router
  chose for the step's token, vs gathering the active heads' keys/values for one fused call (the alternative the
  skipping path does not take), and vs the dense call again (a noise check);
- whole step: ``model(input_ids=token, cache=...)`` for the base model, MoH with the dense gated path
  (``skip_inactive_heads=False``) and MoH with skipping. The cache is filled with random keys/values (building a 16k
  cache by prefill would take minutes on CPU and does not change a decode step's cost) and cropped back after every
  step, so every step appends to the same S cached tokens, as generation does (``DynamicCache`` concatenates: every
  step also copies the whole cache, in all three variants).

``forward``: whole-model forward of ``--batch`` x ``--seq`` tokens (prefill), base vs MoH (both routers), plus the
analytic share of the forward FLOPs a perfect sparse-head kernel could skip.

    python benchmarks/moh.py --threads 1                          # decode table
    python benchmarks/moh.py --threads 1 --kv-heads 4             # same with GQA (groups of 4)
    python benchmarks/moh.py forward --threads 1                  # prefill forward table
    python benchmarks/moh.py --threads 1 --json out.json          # also write every timing
    python benchmarks/moh.py --threads 1 --profile                # + operator shares of the base model's step

Runs are interleaved with a rotating order (A B C, B C A, C A B, ...) and each reported time is the median of
``--repeats`` runs after ``--warmup`` rounds; ratios are variant / base from the same rounds. Wall and process-CPU
medians are both printed: with one thread the CPU time is the work done and is the robust number on a shared
machine. "dense again" times the dense attention a second time in the same rounds: its ratio shows the noise.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import medians, set_threads, timed, write_json
from peft import get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_kan  # noqa: F401  (registers MoH)
from hf_kan.moh import MoHConfig, MoHLayer
from hf_kan.moh.skip import skipped_head_attention


def build(args: argparse.Namespace, max_positions: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def moh_model(base: LlamaForCausalLM, args: argparse.Namespace, router: str, skip: bool) -> torch.nn.Module:
    config = MoHConfig(router=router, active_fraction=args.active_fraction, skip_inactive_heads=skip)
    torch.manual_seed(1)  # same router init for every variant
    return get_peft_model(copy.deepcopy(base), config).eval()


def time_rotated(fns: dict[str, Callable[[], object]], repeats: int,
                 warmup: int) -> dict[str, list[tuple[float, float]]]:
    """Per name, ``repeats`` (wall, CPU) timings after ``warmup`` untimed rounds. Every round calls each function
    once, starting one further along each round (A B C, B C A, C A B, ...), so that no variant always runs right
    after the same one (a variant that evicts the caches would otherwise always slow down the next)."""
    names = list(fns)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        for i in range(len(names)):
            name = names[(round_ + i) % len(names)]
            t = timed(fns[name])
            if round_ >= warmup:
                times[name].append(t)
    return times


def ratio_table(title: str, median: dict[str, list[float]], base: str) -> None:
    """Print median wall and CPU milliseconds per variant and their ratios to ``base``."""
    print(f"  {title:<34}{'wall ms':>9}{'ratio':>8}{'CPU ms':>9}{'ratio':>8}")
    for name, (wall, cpu) in median.items():
        b_wall, b_cpu = median[base]
        print(f"    {name:<32}{wall * 1e3:>9.2f}{wall / b_wall:>8.3f}{cpu * 1e3:>9.2f}{cpu / b_cpu:>8.3f}")


# ----------------------------------------------------------------------------------------------------------- decode


def random_cache(model: LlamaForCausalLM, batch: int, length: int) -> DynamicCache:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    g = torch.Generator().manual_seed(length)
    cache = DynamicCache()
    for layer in range(c.num_hidden_layers):
        shape = (batch, c.num_key_value_heads, length, head_dim)
        cache.update(torch.randn(shape, generator=g), torch.randn(shape, generator=g), layer)
    return cache


def gathered_one_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, active: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """The single-fused-call alternative: gather every active (sample, head)'s query and its keys/values into one
    tensor (copies) and make one SDPA call; (B, 1, H, D) with zeros for inactive heads."""
    batch, heads, _, dim = q.shape
    b, h = active[:, 0].nonzero(as_tuple=True)
    kv = h // (heads // k.shape[1])
    out = q.new_zeros(batch, heads, 1, dim)
    out[b, h] = F.scaled_dot_product_attention(q[b, h][None], k[b, kv][None], v[b, kv][None], scale=scaling)[0]
    return out.transpose(1, 2)


def layer0_gates(model: torch.nn.Module) -> list[torch.Tensor]:
    """Record the gates layer 0's router computes (read when its output projection runs)."""
    layer = next(m for m in model.modules() if isinstance(m, MoHLayer))
    seen: list[torch.Tensor] = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(m.pending_gates().detach().clone()))
    return seen


def profile_step(run: Callable[[], object], steps: int = 5) -> None:
    """Print the operators taking the largest shares of ``steps`` calls of ``run`` (torch.profiler, self CPU)."""
    from torch.profiler import profile

    with torch.inference_mode(), profile() as prof:
        for _ in range(steps):
            run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:4]
    print("  base step, largest operator shares: " + ", ".join(f"{e.key} {e.self_cpu_time_total / total:.0%}"
                                                            for e in top))


def decode_at(length: int, variants: dict[str, torch.nn.Module], gates_seen: list[torch.Tensor],
              args: argparse.Namespace) -> dict:
    """Time one decode step (whole model, every variant) and layer 0's attention (dense vs skipping) at
    ``length`` cached tokens; print and return the medians."""
    base = variants["base"]
    c = base.config
    heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    attn = base.model.layers[0].self_attn
    token = torch.randint(0, args.vocab, (args.batch, 1), generator=torch.Generator().manual_seed(0))
    position = torch.full((args.batch, 1), length)
    caches = {name: random_cache(base, args.batch, length) for name in variants}

    def step(name: str) -> None:
        variants[name](input_ids=token, cache=caches[name], position_ids=position)
        caches[name].crop(-1)

    with torch.inference_mode():
        steps = time_rotated({name: (lambda n=name: step(n)) for name in variants}, args.repeats,
                             warmup=args.warmup)
        active = (gates_seen[-1] != 0).view(args.batch, 1, heads)  # the router's choice for this step's token
        q = torch.randn(args.batch, heads, 1, head_dim, generator=torch.Generator().manual_seed(1))
        k, v = caches["base"].layers[0].keys, caches["base"].layers[0].values

        def moh_path() -> torch.Tensor:  # what MoH's attention function runs: skipping, or dense when it declines
            out = skipped_head_attention(q, k, v, None, active, attn.scaling)
            return out if out is not None else sdpa_attention_forward(attn, q, k, v, None, scaling=attn.scaling)[0]

        attention = time_rotated({
            "dense (transformers sdpa)": lambda: sdpa_attention_forward(attn, q, k, v, None, scaling=attn.scaling),
            "moh_skip (dense if declined)": lambda: moh_path(),
            "gather + one call": lambda: gathered_one_call(q, k, v, active, attn.scaling),
            "dense again (noise check)": lambda: sdpa_attention_forward(attn, q, k, v, None, scaling=attn.scaling),
        }, args.repeats, warmup=args.warmup)
        skipped = skipped_head_attention(q, k, v, None, active, attn.scaling)
        dense = sdpa_attention_forward(attn, q, k, v, None, scaling=attn.scaling)[0]
    kept = active.view(args.batch, 1, heads, 1)
    exact = bool(torch.equal(skipped * kept, dense * kept)) if skipped is not None else None
    kv_read = active.view(args.batch, kv_heads, heads // kv_heads).any(-1).float().mean().item()
    step_median = {n: medians(t) for n, t in steps.items()}
    attn_median = {n: medians(t) for n, t in attention.items()}
    print(f"{length} cached tokens: active heads {active.float().mean():.0%}, key/value heads read {kv_read:.0%}, "
          f"skipping path {'taken' if skipped is not None else 'NOT taken (dense)'}, bitwise equal to dense on the "
          f"active heads: {exact}")
    ratio_table("attention alone (layer 0)", attn_median, "dense (transformers sdpa)")
    ratio_table("whole decode step", step_median, "base")
    if args.profile:
        profile_step(lambda: step("base"))
    return {"attention_median_s": attn_median, "step_median_s": step_median, "kv_heads_read": kv_read,
            "attention_times_s": attention, "step_times_s": steps, "exact": exact}


def run_decode(args: argparse.Namespace) -> dict:
    contexts = [int(c) for c in args.contexts.split(",")]
    base = build(args, max(contexts) + 16)
    variants = {
        "base": base,
        "moh_dense (skip off)": moh_model(base, args, args.router, skip=False),
        "moh_skip": moh_model(base, args, args.router, skip=True),
    }
    gates_seen = layer0_gates(variants["moh_skip"])
    c = base.config
    print(
        f"Llama hidden={args.hidden} layers={args.layers} heads={c.num_attention_heads}/{c.num_key_value_heads} "
        f"batch={args.batch} router={args.router} active={args.active_fraction:.0%} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}; medians of {args.repeats}, interleaved"
    )
    return {length: decode_at(length, variants, gates_seen, args) for length in contexts}


# ---------------------------------------------------------------------------------------------------------- forward


def skippable_flop_fraction(model: LlamaForCausalLM, seq: int, active_fraction: float) -> float:
    """Upper bound on the forward-FLOP share a sparse-head attention kernel could skip: the inactive fraction of
    the causal QK^T and AV products (2 * T^2 / 2 * D multiply-adds each per head), over all matmul FLOPs."""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    linear = 2 * seq * sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    attn_core = c.num_hidden_layers * c.num_attention_heads * 2 * (2 * (seq * seq / 2) * head_dim)
    return (1 - active_fraction) * attn_core / (linear + attn_core)


def run_forward(args: argparse.Namespace) -> dict:
    base = build(args, max(args.seq, 128))
    variants = {"base": base}
    for router in ("query_norm", "learned"):
        variants[f"moh_{router}"] = moh_model(base, args, router, skip=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        timings = time_rotated({name: (lambda m=model: m(input_ids=ids)) for name, model in variants.items()},
                               args.repeats, warmup=args.warmup)
    median = {name: medians(t) for name, t in timings.items()}
    bound = skippable_flop_fraction(base, args.seq, args.active_fraction)
    print(
        f"Llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads or args.heads} "
        f"batch={args.batch} seq={args.seq} threads={torch.get_num_threads()} active={args.active_fraction:.0%}"
    )
    ratio_table("whole forward (prefill)", median, "base")
    print(f"analytic bound on skippable FLOPs with a sparse-head kernel: {bound:.1%} of the forward (not measured)")
    return {"median_s": median, "times_s": timings, "skippable_flops": bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="decode", choices=["decode", "forward"])
    parser.add_argument("--hidden", type=int, default=None, help="default: 2048 (decode), 256 (forward)")
    parser.add_argument("--layers", type=int, default=None, help="default: 2 (decode), 4 (forward)")
    parser.add_argument("--heads", type=int, default=None, help="default: 16 (decode), 8 (forward)")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (decode), 4 (forward)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=None, help="default: 1 (decode), 2 (forward)")
    parser.add_argument("--contexts", default="1024,4096,16384", help="decode: cached tokens, comma-separated")
    parser.add_argument("--seq", type=int, default=256, help="forward: tokens per sample")
    parser.add_argument("--router", default="query_norm", choices=["query_norm", "learned"], help="decode router")
    parser.add_argument("--active-fraction", type=float, default=0.75)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="decode: also profile the base model's step")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    decode = args.mode == "decode"
    for name, (dec, fwd) in {"hidden": (2048, 256), "layers": (2, 4), "heads": (16, 8), "batch": (1, 2)}.items():
        if getattr(args, name) is None:
            setattr(args, name, dec if decode else fwd)
    if args.kv_heads is None and not decode:
        args.kv_heads = 4
    set_threads(args.threads)
    results = run_decode(args) if decode else run_forward(args)
    write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
