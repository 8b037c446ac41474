"""Skipping inactive heads (hf_kan.moh.skip) equals the dense gated computation: the attention function on its own
(decode and prefill, padding masks, GQA) and whole models (cached generation, padded batches, GQA, fallbacks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_kan  # noqa: F401  (registers MoH)
from hf_kan.moh import MoHConfig, MoHLayer, skip
from hf_kan.moh.skip import MOH_ATTENTION, MoHAttentionConfig, plan_calls, skipped_head_attention

VOCAB = 64


def dense(q, k, v, mask, scaling, causal=False):
    """Reference: every head, (B, T, H, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling).transpose(1, 2)


def padding_mask(batch: int, q_len: int, kv_len: int, pads: list[int]) -> torch.Tensor:
    """(B, 1, T, S) bool: causal (queries are the last T keys) and left padding of ``pads[b]`` keys."""
    rows = torch.arange(kv_len - q_len, kv_len)[:, None]
    keys = torch.arange(kv_len)[None, :]
    mask = (keys <= rows)[None, None].repeat(batch, 1, 1, 1)
    for b, p in enumerate(pads):
        mask[b, :, :, :p] = False
    return mask


def assert_equal_on_active(out, ref, active, exact: bool):
    """``out`` equals ``ref`` (both (B, T, H, D)) on the active (sample, query, head) triples ``active``."""
    if exact:
        assert torch.equal(out[active], ref[active])
    else:
        torch.testing.assert_close(out[active], ref[active], rtol=1e-6, atol=1e-6)


@pytest.fixture(autouse=True)
def one_thread():
    """Decode skipping depends on the intra-op thread count (see test_decode_skips_only_when_it_saves_thread_time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def skip_small(monkeypatch):
    """Let tiny test models take the skipping path (by default decode must skip >= 2^19 cached elements)."""
    monkeypatch.setattr(skip, "MIN_DECODE_SKIPPED", 0)


# ------------------------------------------------------------------------------------------- the function itself


def test_plan_calls_by_hand():
    # 2 samples, 4 kv heads, 3 blocks; head 0 needed everywhere -> one batched call
    needed = torch.tensor([
        [[1, 1, 1], [0, 0, 0], [1, 0, 1], [1, 0, 1]],
        [[1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]],
    ], dtype=torch.bool)
    calls = [(c.batch, c.kv_start, c.kv_end, c.row_start, c.row_end) for c in plan_calls(needed, q_len=150, block=64)]
    assert calls == [
        (slice(None), 0, 1, 0, 150),
        (slice(0, 1), 2, 4, 0, 64), (slice(0, 1), 2, 4, 128, 150),  # heads 2-3 share their block runs
        (slice(1, 2), 1, 2, 0, 128),
    ]


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2)])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_equals_dense_on_active_heads(skip_small, heads, kv_heads, padded):
    batch, kv_len, dim = 3, 200, 16
    q = torch.randn(batch, heads, 1, dim)
    k, v = torch.randn(batch, kv_heads, kv_len, dim), torch.randn(batch, kv_heads, kv_len, dim)
    active = torch.zeros(batch, 1, heads, dtype=torch.bool)
    active[0, 0, :4] = True  # sample 0: second half of the heads off (whole GQA groups)
    active[1, 0, [0, 1, 2, 3, 5, 7]] = True
    active[2, 0, [0, 1, 2, 3, 4]] = True
    mask = padding_mask(batch, 1, kv_len, [0, 37, 5]) if padded else None
    out = skipped_head_attention(q, k, v, mask, active, dim**-0.5)
    assert out is not None and out.shape == (batch, 1, heads, dim)
    ref = dense(q, k, v, mask, dim**-0.5)
    assert_equal_on_active(out, ref, active, exact=kv_heads == heads)
    group = heads // kv_heads
    needed = active.view(batch, kv_heads, group).any(-1).repeat_interleave(group, -1)[:, None]
    assert torch.count_nonzero(out[~needed]) == 0, "heads of unread key/value heads stay zero"


def test_decode_returns_none_when_nothing_or_too_little_can_be_skipped():
    q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 8192, 64), torch.randn(1, 2, 8192, 64)
    every_group = torch.tensor([[[True, False, True, False]]])  # each GQA group has an active head
    assert skipped_head_attention(q, k, v, None, every_group, 0.3) is None
    one_group = torch.tensor([[[True, True, False, False]]])
    # one key/value head of 8192 x 64 elements not read: 2^19, just enough to pay for the extra calls
    assert skipped_head_attention(q, k, v, None, one_group, 0.3) is not None
    assert skipped_head_attention(q, k[:, :, 1:], v[:, :, 1:], None, one_group, 0.3) is None


def test_decode_skips_only_when_it_saves_thread_time(skip_small):
    # 1 sample, 8 heads, 2 inactive: calls over heads [0, 5) and [6, 7) -> 5 + 1 head-times with one thread (< 8),
    # ceil(5/2) + 1 = 4 (= ceil(8/2): no gain) with two, 2 (> 1) with eight: the dense call is used
    q, k, v = torch.randn(1, 8, 1, 8), torch.randn(1, 8, 300, 8), torch.randn(1, 8, 300, 8)
    active = torch.tensor([[[True] * 5 + [False, True, False]]])
    assert skipped_head_attention(q, k, v, None, active, 0.3) is not None
    for threads in (2, 8):
        torch.set_num_threads(threads)
        assert skipped_head_attention(q, k, v, None, active, 0.3) is None
    torch.set_num_threads(2)
    wide = torch.tensor([[[True] * 4 + [False] * 4]])  # ceil(4/2) = 2 < 4: worth it with two threads
    assert skipped_head_attention(q, k, v, None, wide, 0.3) is not None


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_skips_inactive_query_blocks(heads, kv_heads, padded):
    batch, q_len, dim = 2, 200, 8  # blocks of 64: [0, 64), [64, 128), [128, 192), [192, 200)
    q = torch.randn(batch, heads, q_len, dim)
    k, v = torch.randn(batch, kv_heads, q_len, dim), torch.randn(batch, kv_heads, q_len, dim)
    active = torch.rand(batch, q_len, heads) < 0.5
    active[..., 0] = True
    active[0, 64:192, 2:] = False  # sample 0: heads 2-3 (a whole GQA group) off in blocks 1 and 2
    active[1, :128, 1:] = False  # sample 1: heads 1-3 off in blocks 0 and 1
    mask = padding_mask(batch, q_len, q_len, [0, 11]) if padded else None
    out = skipped_head_attention(q, k, v, mask, active, dim**-0.5)
    assert out is not None
    ref = dense(q, k, v, mask, dim**-0.5, causal=mask is None)
    valid = torch.ones(batch, q_len, heads, dtype=torch.bool)
    if padded:
        valid[1, :11] = False  # padding queries see no key: undefined in both paths
    assert_equal_on_active(out, ref, active & valid, exact=False)
    assert torch.count_nonzero(out[1, :128, 2:]) == 0


def test_prefill_with_per_token_routing_stays_dense():
    q, k, v = torch.randn(1, 4, 256, 8), torch.randn(1, 4, 256, 8), torch.randn(1, 4, 256, 8)
    active = torch.rand(1, 256, 4) < 0.75  # every block has active queries for every head
    assert skipped_head_attention(q, k, v, None, active, 0.3) is None
    assert skipped_head_attention(q, k, v[:, :, :200], None, active, 0.3) is None  # unmasked T > 1 needs S == T


# ------------------------------------------------------------------------------------------------- whole models


def tiny_llama(heads=8, kv_heads=8, attn="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, pad_token_id=0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)  # attention far from uniform
    return model.eval()


def moh_pair(base, **config):
    """The same MoH adapter with and without skipping (identical router weights)."""
    torch.manual_seed(1)
    skipping = get_peft_model(copy.deepcopy(base), MoHConfig(skip_inactive_heads=True, **config)).eval()
    plain = get_peft_model(copy.deepcopy(base), MoHConfig(skip_inactive_heads=False, **config)).eval()
    plain.load_state_dict(skipping.state_dict())
    return skipping, plain


def count_skips(monkeypatch) -> list[bool]:
    taken: list[bool] = []
    original = skip.skipped_head_attention

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(skip, "skipped_head_attention", spy)
    return taken


def generate(model, ids, mask, steps=6):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize(("heads", "kv_heads", "router"), [(8, 8, "query_norm"), (8, 8, "learned"),
                                                          (8, 4, "query_norm")])
def test_cached_generation_with_padding_equals_dense_gated(monkeypatch, skip_small, heads, kv_heads, router):
    base = tiny_llama(heads, kv_heads)
    skipping, plain = moh_pair(base, router=router, router_init_std=0.5)
    ids = torch.randint(3, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    ids[mask == 0] = 0
    taken = count_skips(monkeypatch)
    fast, ref = generate(skipping, ids, mask), generate(plain, ids, mask)
    assert sum(taken) >= 3, "decode steps took the skipping path"
    assert not taken[0] and not taken[1], "prefill with per-token routing stays dense"
    assert torch.equal(fast.sequences, ref.sequences)
    for a, b in zip(fast.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if kv_heads == heads:
            assert torch.equal(a, b)  # same SDPA kernel on views of the same tensors


def test_fallbacks_to_the_dense_gated_path(monkeypatch, skip_small):
    base = tiny_llama()
    skipping, plain = moh_pair(base, router="learned", router_init_std=0.5)
    attn = skipping.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.config, MoHAttentionConfig) and attn.config._attn_implementation == MOH_ATTENTION
    taken = count_skips(monkeypatch)
    ids = torch.randint(3, VOCAB, (2, 5))
    # training: the gates need gradients (and the straight-through estimator needs every head): dense
    skipping.train()
    skipping(ids, labels=ids).loss.backward()
    assert taken == []
    skipping.eval()
    # disabled adapter: exactly the base model, through the real implementation
    with skipping.disable_adapter():
        assert attn.config._attn_implementation == "sdpa"
        assert torch.equal(skipping(ids).logits, base(ids).logits)
    # another attention implementation: the view reports it and the model runs it unchanged
    skipping.base_model.model.set_attn_implementation("eager")
    plain.base_model.model.set_attn_implementation("eager")
    assert attn.config._attn_implementation == "eager"
    assert torch.equal(skipping(ids).logits, plain(ids).logits)
    assert taken == []


def test_deepcopy_save_load_and_unload_keep_the_config_view_consistent(tmp_path, monkeypatch, skip_small):
    base = tiny_llama()
    reference = copy.deepcopy(base)
    skipping, _ = moh_pair(base, router="query_norm")
    clone = copy.deepcopy(skipping)
    attn = clone.base_model.model.model.layers[1].self_attn
    assert attn.config.base is clone.base_model.model.config  # the view follows the copy
    assert attn.config.moh_layer is attn.o_proj
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    taken = count_skips(monkeypatch)
    assert torch.equal(generate(clone, ids, mask).sequences, generate(skipping, ids, mask).sequences)
    assert any(taken)

    skipping.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    assert loaded.peft_config["default"].skip_inactive_heads
    assert isinstance(loaded.base_model.model.model.layers[0].self_attn.config, MoHAttentionConfig)
    assert torch.equal(generate(loaded, ids, mask).sequences, generate(skipping, ids, mask).sequences)

    plain = skipping.unload()
    assert not any(isinstance(m.__dict__.get("config"), MoHAttentionConfig) for m in plain.modules())
    assert plain.model.layers[0].self_attn.config is plain.config
    assert not any(isinstance(m, MoHLayer) for m in plain.modules())
    assert torch.equal(plain(ids).logits, reference(ids).logits)
