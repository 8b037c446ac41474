"""MoH follows the authors' training recipe: head split, learned-router init, routing dtype (loss averaging over
layers is tested with the other loss tests in test_moh_peft.py)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_kan  # noqa: F401  (registers MoH)
from hf_kan.moh import LearnedHeadRouter, MoHConfig, MoHLayer, QueryNormHeadRouter


def tiny_llama(heads: int, kv_heads: int | None = None, head_dim: int = 4, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=head_dim * heads, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads, pad_token_id=0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(dtype).eval()


def layer_gates(model, ids) -> torch.Tensor:
    """The gates [tokens, H] layer 0's router computes for ``ids``."""
    layer = next(m for m in model.modules() if isinstance(m, MoHLayer))
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(m.pending_gates().detach().clone()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen[0]


# The authors' rule: int(0.5 H) shared + int(0.25 H) routed heads per token at 75 % (the old rule, round(0.75 H) -
# H // 2 routed, gave 3 routed heads at H = 10 and 2 at H = 7 and H = 18).
@pytest.mark.parametrize(("heads", "shared", "top_k"), [(2, 1, 0), (7, 3, 1), (8, 4, 2), (10, 5, 2), (18, 9, 4),
                                                        (32, 16, 8)])
def test_default_head_split_follows_the_authors(heads, shared, top_k):
    assert MoHConfig().head_split(heads) == (shared, top_k)
    ids = torch.randint(1, 64, (1, 6))
    for router in ("query_norm", "learned"):
        model = get_peft_model(tiny_llama(heads), MoHConfig(router=router))
        layer = next(m for m in model.modules() if isinstance(m, MoHLayer))
        assert layer.moh_head_split["default"] == (shared, top_k)
        active = layer_gates(model, ids) != 0
        assert active[:, :shared].all()
        assert torch.equal(active.sum(-1), torch.full((6,), shared + top_k))


def test_head_split_with_other_fractions_and_explicit_shared_heads():
    assert MoHConfig(active_fraction=0.7).head_split(10) == (5, 2)  # (0.7 - 0.5) * 10 = 1.999...: no float loss
    assert MoHConfig(active_fraction=1.0).head_split(7) == (3, 4)  # every head, although int(0.5 * 7) = 3
    assert MoHConfig(active_fraction=0.5).head_split(7) == (3, 0)
    assert MoHConfig(active_fraction=0.75, num_shared_heads=2).head_split(8) == (2, 4)
    assert MoHConfig(top_k=3).head_split(10) == (5, 3)


def test_learned_router_routes_tokens_differently_at_init_with_gates_near_one():
    heads, hidden = 16, 64
    model = get_peft_model(tiny_llama(heads), MoHConfig(router="learned"))
    router = next(m for m in model.modules() if isinstance(m, MoHLayer)).moh_router["default"]
    w = router.proj.weight
    torch.testing.assert_close(w[: router.num_routed].std().item(), 1e-2 / hidden**0.5, rtol=0.25, atol=0)
    assert torch.count_nonzero(w[router.num_routed :]) == 0  # W_s, W_h start at zero
    gates = layer_gates(model, torch.randint(1, 64, (2, 24)))
    active = gates != 0
    patterns = {tuple(row.tolist()) for row in active[:, router.num_shared :]}
    assert len(patterns) > 8, "tokens select different routed heads at step 0"
    assert torch.equal(gates[:, : router.num_shared], torch.ones(48, router.num_shared))  # shared gates exactly 1
    routed = gates[:, router.num_shared :][active[:, router.num_shared :]]
    assert (routed - 1).abs().max() < 0.05, "routed gates start close to 1"

    # router_init_std=0: the exactly uniform router, every token picks the same heads (the documented trade-off)
    zero = get_peft_model(tiny_llama(heads), MoHConfig(router="learned", router_init_std=0.0))
    gates = layer_gates(zero, torch.randint(1, 64, (2, 24)))
    assert len({tuple(row.tolist()) for row in gates != 0}) == 1
    assert torch.equal(gates[gates != 0], torch.ones(48 * 12))


def test_routing_runs_in_float64_for_float64_models():
    torch.manual_seed(0)
    router = LearnedHeadRouter(hidden_size=6, num_heads=4, num_shared=2, top_k=1, init_std=0.5).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    gates, aux = router.train()(x)
    assert gates.dtype == torch.float64 and aux.dtype == torch.float64
    # float64 hand computation: gates match to float64 precision, which float32 logits could not
    logits = x @ router.proj.weight.T
    routed, shared, mix = logits.split([2, 2, 2], dim=-1)
    alpha = 2 * torch.softmax(mix, -1)
    probs = torch.softmax(routed, -1)
    top = probs.argmax(-1, keepdim=True)
    g_routed = torch.zeros_like(probs).scatter(1, top, 1.0) * alpha[:, 1:]  # k = 1: renormalised gate is 1
    expected = torch.cat([2 * torch.softmax(shared, -1) * alpha[:, :1], g_routed], -1)
    torch.testing.assert_close(gates, expected, rtol=1e-13, atol=1e-13)

    query = torch.randn(5, 4 * 3, dtype=torch.float64)
    gates, _ = QueryNormHeadRouter(num_heads=4, num_shared=2, top_k=1)(None, query)
    assert gates.dtype == torch.float64
    # narrower models still route in float32
    gates, _ = QueryNormHeadRouter(num_heads=4, num_shared=2, top_k=1)(None, query.to(torch.bfloat16))
    assert gates.dtype == torch.float32
    bf16 = LearnedHeadRouter(hidden_size=6, num_heads=4, num_shared=2, top_k=1, init_std=0.5).to(torch.bfloat16)
    assert bf16(x.to(torch.bfloat16))[0].dtype == torch.float32


def test_float64_model_routes_in_float64_end_to_end():
    model = get_peft_model(tiny_llama(8, dtype=torch.float64), MoHConfig(router="learned", router_init_std=0.3))
    gates = layer_gates(model, torch.randint(1, 64, (1, 5)))
    assert gates.dtype == torch.float64
    assert model(torch.randint(1, 64, (1, 5))).logits.dtype == torch.float64
