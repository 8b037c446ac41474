"""MoH as a PEFT method on tiny random models: registration, round trips, invariants, routing and losses."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import PeftType
from transformers import LlamaConfig, LlamaForCausalLM

import hf_kan  # registers MoH
from hf_kan.errors import HFKanConfigError, InputLayoutError, UnsupportedModelError
from hf_kan.moh import (
    LearnedHeadRouter,
    MoHConfig,
    MoHLayer,
    QueryNormHeadRouter,
    load_balance_loss,
    moh_aux_loss,
    register_moh,
)

VOCAB = 64


def tiny_llama(heads: int = 8, kv_heads: int = 4, layers: int = 2, attn: str = "sdpa", seed: int = 0):
    """A tiny GQA Llama (head_dim 8) with q/k scaled up so attention is far from uniform."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=16 * heads, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.eval()


def fresh_copy(model):
    return copy.deepcopy(model)


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 9))


def moh_layers(model) -> list[MoHLayer]:
    return [m for m in model.modules() if isinstance(m, MoHLayer)]


def randomize_routers(model, std: float = 0.5) -> None:
    with torch.no_grad():
        for layer in moh_layers(model):
            for p in layer.moh_router.parameters():
                p.normal_(std=std)


def capture_gated_heads(model, num_heads: int, head_dim: int) -> list[torch.Tensor]:
    """Register hooks recording the (gated) input of every wrapped o_proj as [tokens, H, D]."""
    seen: list[torch.Tensor] = []
    for layer in moh_layers(model):
        layer.get_base_layer().register_forward_pre_hook(
            lambda m, args: seen.append(args[0].detach().reshape(-1, num_heads, head_dim))
        )
    return seen


def test_registration_is_idempotent_and_typed():
    register_moh()
    register_moh()
    assert PeftType("MOH") is PeftType.MOH
    config = MoHConfig()
    assert config.peft_type is PeftType.MOH and config.peft_type.value == "MOH"


@pytest.mark.parametrize("router", ["query_norm", "learned"])
def test_round_trip_reproduces_logits_exactly(tmp_path, ids, router):
    base = tiny_llama()
    reference_base = fresh_copy(base)
    model = get_peft_model(base, MoHConfig(router=router, task_type="CAUSAL_LM"))
    randomize_routers(model)
    expected = model(ids).logits
    assert not torch.allclose(expected, reference_base(ids).logits, atol=1e-3), "MoH must change the output"
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(reference_base, tmp_path)
    assert isinstance(loaded.peft_config["default"], MoHConfig)
    assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.parametrize("router", ["query_norm", "learned"])
def test_disable_adapter_gives_base_exactly(ids, router):
    base = tiny_llama()
    expected = fresh_copy(base)(ids).logits
    model = get_peft_model(base, MoHConfig(router=router))
    randomize_routers(model)
    with model.disable_adapter():
        assert torch.equal(model(ids).logits, expected)
    assert not torch.allclose(model(ids).logits, expected, atol=1e-3)


def test_unload_restores_base_and_removes_hooks(ids):
    base = tiny_llama()
    expected = fresh_copy(base)(ids).logits
    model = get_peft_model(base, MoHConfig())
    with pytest.raises(HFKanConfigError, match="cannot be merged"):
        model.merge_and_unload()
    plain = model.unload()
    assert not moh_layers(plain)
    assert all(not layer.self_attn.q_proj._forward_hooks for layer in plain.model.layers)
    assert torch.equal(plain(ids).logits, expected)


def test_all_heads_active_uniform_gates_equal_base(ids):
    base = tiny_llama()
    expected = fresh_copy(base)(ids).logits
    # learned router, zero init (uniform probabilities) and every routed head selected: every gate is 1
    model = get_peft_model(fresh_copy(base), MoHConfig(router="learned", active_fraction=1.0, router_init_std=0.0))
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # parameter-free router with all heads active: binary gates are all exactly 1
    model = get_peft_model(fresh_copy(base), MoHConfig(router="query_norm", active_fraction=1.0))
    assert torch.equal(model(ids).logits, expected)


def test_query_norm_router_keeps_top_k_by_query_norm(ids):
    heads, head_dim = 8, 8
    model = get_peft_model(tiny_llama(heads=heads), MoHConfig(router="query_norm"))  # 4 shared, top-2 of 4 routed
    gated = capture_gated_heads(model, heads, head_dim)
    queries: list[torch.Tensor] = []
    for block in model.base_model.model.model.layers:
        block.self_attn.q_proj.register_forward_hook(lambda m, a, out: queries.append(out.detach()))
    model(ids)
    assert len(gated) == len(queries) == 2
    for heads_out, q in zip(gated, queries):
        active = heads_out.abs().sum(-1) > 0  # [tokens, H]
        assert active[:, :4].all(), "shared heads are always on"
        assert torch.equal(active[:, 4:].sum(-1), torch.full((active.shape[0],), 2))
        norms = q.reshape(-1, heads, head_dim)[:, 4:].norm(dim=-1)
        expected = torch.zeros_like(norms, dtype=torch.bool).scatter(1, norms.topk(2, dim=-1).indices, True)
        assert torch.equal(active[:, 4:], expected)


@pytest.mark.parametrize(("fraction", "shared", "top_k", "active"), [(0.75, None, None, 6), (0.5, 2, None, 4),
                                                                   (0.75, 1, 3, 4)])
def test_learned_router_activates_exactly_k_routed_heads(ids, fraction, shared, top_k, active):
    config = MoHConfig(router="learned", active_fraction=fraction, num_shared_heads=shared, top_k=top_k)
    model = get_peft_model(tiny_llama(), config)
    randomize_routers(model)
    gated = capture_gated_heads(model, 8, 8)
    model(ids)
    for heads_out in gated:
        counts = (heads_out.abs().sum(-1) > 0).sum(-1)
        assert torch.equal(counts, torch.full_like(counts, active))


def test_learned_gates_scaled_to_mha_at_init():
    router = LearnedHeadRouter(hidden_size=16, num_heads=8, num_shared=4, top_k=2, init_std=0.0)
    gates, aux = router(torch.randn(5, 16))
    assert torch.equal((gates > 0).sum(-1), torch.full((5,), 6))
    torch.testing.assert_close(gates[gates > 0], torch.ones(30))
    # uniform router: every token picks the same two heads (ties), so f = (1, 1, 0, 0), P_i = 1/4 -> L_b = 4 * 2/4
    assert aux.item() == pytest.approx(2.0)


def test_load_balance_loss_matches_hand_computation():
    # 3 routed heads, no shared, top-1, 2-d tokens; W_r x gives the logits below.
    router = LearnedHeadRouter(hidden_size=2, num_heads=3, num_shared=0, top_k=1)
    with torch.no_grad():
        router.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))  # W_r (no shared heads)
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [-1.0, -1.0]])
    _, aux = router(x)
    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 3.0, 0.0], [-1.0, -1.0, 0.0]]
    probs = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in logits]
    chosen = [0, 1, 1, 2]  # argmax of each row
    f = [chosen.count(i) / 4 for i in range(3)]  # 1/4, 2/4, 1/4
    p = [sum(row[i] for row in probs) / 4 for i in range(3)]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p))
    assert aux.item() == pytest.approx(expected, rel=1e-6)
    assert load_balance_loss(torch.tensor(probs), torch.nn.functional.one_hot(torch.tensor(chosen), 3)).item() == (
        pytest.approx(expected, rel=1e-6)
    )


def test_aux_loss_is_weighted_mean_over_layers_and_reaches_router(ids):
    # the authors average L_b over layers: weight * mean_l L_b(l), so the effective weight does not grow with depth
    model = get_peft_model(tiny_llama(layers=3), MoHConfig(router="learned", load_balance_weight=0.5,
                                                           router_init_std=0.3))
    model.train()
    model(ids)
    layers = moh_layers(model)
    per_layer = [layer._moh_aux["default"] for layer in layers]
    assert len(per_layer) == 3 and len({round(v.item(), 6) for v in per_layer}) > 1
    total = moh_aux_loss(model)
    torch.testing.assert_close(total, 0.5 * sum(per_layer) / 3)
    assert torch.equal(total, model.base_model.moh_aux_loss())
    total.backward()
    for layer in layers:
        router = layer.moh_router["default"]
        grad = router.proj.weight.grad
        assert grad is not None and grad[: router.num_routed].abs().sum() > 0  # W_r rows
    # the last layer's L_b depends on its W_r only (earlier layers' W_s, W_h reach later L_b through the hidden state)
    assert grad[router.num_routed :].abs().sum() == 0
    # eval forwards record nothing (and clear the previous record)
    model.eval()
    model(ids)
    assert moh_aux_loss(model).item() == 0.0


def test_query_norm_gates_are_binary_with_straight_through_gradient():
    router = QueryNormHeadRouter(num_heads=4, num_shared=2, top_k=1)
    query = torch.randn(6, 4 * 3, requires_grad=True)
    gates, aux = router(None, query)
    assert aux is None
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gates.detach().sum(-1), torch.full((6,), 3.0))
    (gates * torch.arange(4.0)).sum().backward()
    assert query.grad[:, 6:].abs().sum() > 0, "STE passes a gradient to the routed heads' queries"
    assert query.grad[:, :6].abs().sum() == 0, "shared heads' gates are constant"


def test_gqa_eager_and_sdpa_agree(ids):
    outs = []
    for attn in ("eager", "sdpa"):
        model = get_peft_model(tiny_llama(heads=8, kv_heads=2, attn=attn), MoHConfig(router="learned"))
        torch.manual_seed(1)  # same router weights for both implementations
        randomize_routers(model)
        outs.append(model(ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_cached_decoding_matches_full_forward(ids):
    model = get_peft_model(tiny_llama(), MoHConfig(router="query_norm", task_type="CAUSAL_LM"))
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        full = model(generated).logits[:, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(full, generated[:, ids.shape[1] :])


def test_lora_then_moh_trains_and_round_trips(tmp_path, ids):
    base = tiny_llama()
    reference_base = fresh_copy(base)
    expected_base = reference_base(ids).logits
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"])
    config = MoHConfig(router="learned", router_init_std=0.1, lora_config=lora, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    attn = model.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.o_proj, MoHLayer) and isinstance(attn.o_proj.base_layer, LoraLayer)
    assert isinstance(attn.q_proj, LoraLayer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("moh_router" in n for n in trainable)
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss + moh_aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and any("moh_router" in n for n in changed)

    model.eval()
    expected = model(ids).logits
    with model.disable_adapter():  # turns LoRA off too
        assert torch.equal(model(ids).logits, expected_base)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference_base, tmp_path)
    assert torch.equal(loaded(ids).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    plain = loaded.unload()
    assert not any(isinstance(m, (MoHLayer, LoraLayer)) for m in plain.modules())
    assert torch.equal(plain(ids).logits, expected_base)


def test_config_errors_are_actionable():
    with pytest.raises(HFKanConfigError, match="router"):
        MoHConfig(router="softmax")
    with pytest.raises(HFKanConfigError, match="active_fraction"):
        MoHConfig(active_fraction=0.0)
    with pytest.raises(HFKanConfigError, match="top_k"):
        get_peft_model(tiny_llama(heads=4, kv_heads=2), MoHConfig(top_k=3))  # 2 shared, only 2 routed
    with pytest.raises(HFKanConfigError, match="num_shared_heads"):
        get_peft_model(tiny_llama(heads=4, kv_heads=2), MoHConfig(num_shared_heads=5))
    with pytest.raises(UnsupportedModelError, match="query_module"):
        get_peft_model(tiny_llama(heads=4, kv_heads=2), MoHConfig(query_module="wq"))


def test_gradient_checkpointing_gives_same_gradients(ids):
    base = tiny_llama()
    plain = get_peft_model(fresh_copy(base), MoHConfig(router="learned", router_init_std=0.3))
    ckpt = get_peft_model(fresh_copy(base), MoHConfig(router="learned", router_init_std=0.3))
    ckpt.load_state_dict(plain.state_dict())
    ckpt.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    grads = []
    for model in (plain, ckpt):
        model.train()
        (model(ids, labels=ids, use_cache=False).loss + moh_aux_loss(model)).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert grads[0] and all(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_public_api():
    import hf_kan.moh as moh

    assert hf_kan.MoHConfig is MoHConfig and hf_kan.moh_aux_loss is moh.moh_aux_loss
    for name in moh.__all__:
        assert getattr(moh, name) is not None


def test_output_projection_without_query_capture_raises():
    model = get_peft_model(tiny_llama(heads=4, kv_heads=2), MoHConfig())
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    with pytest.raises(InputLayoutError, match="query_module"):
        o_proj(torch.randn(1, 3, 32))
    with model.disable_adapter():  # disabled: plain projection, no router input needed
        x = torch.randn(1, 3, 32)
        assert torch.equal(o_proj(x), o_proj.get_base_layer()(x))
