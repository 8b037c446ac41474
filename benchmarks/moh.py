"""CPU forward latency of a MoH model (75% of heads active per token) vs the same base model, side by side.

MoH here gates head outputs before ``o_proj`` (the parameter-free ``query_norm`` router or the ``learned`` router);
the attention itself is still computed for every (token, head) because PyTorch's dense attention kernels (eager and
sdpa on CPU) have no per-(token, head) sparsity. So on CPU MoH saves no compute: this benchmark measures the
overhead of routing + gating, and prints the share of the model's FLOPs that a sparse-head kernel could skip at
best (the inactive heads' QK^T and AV work), as an analytic bound, not a measurement.

    python benchmarks/moh.py                      # default size, prints a table
    python benchmarks/moh.py --json out.json      # also write the numbers

Runs are interleaved (base, query_norm, learned, base, ...) and each reported time is the median of
``--repeats`` forwards after ``--warmup`` forwards; ratios are MoH / base from the same run.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from _common import set_threads, time_interleaved, write_json
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_kan  # noqa: F401  (registers MoH)
from hf_kan.moh import MoHConfig


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128),
    )
    return LlamaForCausalLM._from_config(config, attn_implementation=args.attn).eval()


def skippable_flop_fraction(model: LlamaForCausalLM, seq: int, active_fraction: float) -> float:
    """Upper bound on the forward-FLOP share a sparse-head attention kernel could skip: the inactive fraction of
    the causal QK^T and AV products (2 * T^2 / 2 * D multiply-adds each per head), over all matmul FLOPs."""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    linear = 2 * seq * sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    attn_core = c.num_hidden_layers * c.num_attention_heads * 2 * (2 * (seq * seq / 2) * head_dim)
    return (1 - active_fraction) * attn_core / (linear + attn_core)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--active-fraction", type=float, default=0.75)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    set_threads(args.threads)

    base = build(args)
    variants = {"base": base}
    for router in ("query_norm", "learned"):
        config = MoHConfig(router=router, active_fraction=args.active_fraction, router_init_std=0.02)
        variants[f"moh_{router}"] = get_peft_model(copy.deepcopy(base), config).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        timings = time_interleaved({name: (lambda m=model: m(input_ids=ids)) for name, model in variants.items()},
                                   args.repeats, warmup=args.warmup)
    times = {name: [wall for wall, _ in t] for name, t in timings.items()}

    median = {name: statistics.median(t) for name, t in times.items()}
    bound = skippable_flop_fraction(base, args.seq, args.active_fraction)
    print(
        f"Llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"batch={args.batch} seq={args.seq} attn={args.attn} threads={torch.get_num_threads()} "
        f"active={args.active_fraction:.0%}"
    )
    print(f"{'variant':<16}{'median ms':>12}{'ratio vs base':>16}")
    for name, value in median.items():
        print(f"{name:<16}{value * 1e3:>12.2f}{value / median['base']:>16.3f}")
    print(f"analytic bound on skippable FLOPs with a sparse-head kernel: {bound:.1%} of the forward (not measured)")
    write_json(args.json, {"args": vars(args), "median_s": median, "times_s": times, "skippable_flops": bound})


if __name__ == "__main__":
    main()
