"""The "hf_kan" backend: config and save/load, errors, the per-layer cache ledger, the layer hooks, hf_kan without
hooks (off == sdpa on every family with every neutral setting: ``test_invariants.py``)."""

import json

import pytest
import torch
import vlm_models as V
from hf_kan.patches import MMAConfig, PatchConfig
from hf_kan.patches.engine import PatchRuntime
from hf_kan.patches.engine.compute import explicit_attention, sdpa_compute

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError, InputLayoutError, UnsupportedModelError

MMA = {"assistant_token_ids": [V.ASSISTANT]}
PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]


def hf_kan_off(family):
    model = V.shared(family, "hf_kan")
    P.apply(model, mma=False)
    return model


# ------------------------------------------------------------------------------------------- status


def test_per_tower_implementation_and_status():
    model = V.build("llava", {"text_config": "hf_kan", "vision_config": "sdpa"})
    assert model.config.vision_config._attn_implementation == "sdpa"
    P.apply(model, mma=MMA)
    st = P.status(model)
    assert st["text_attn_implementation"] == "hf_kan" and st["vision_attn_implementation"] == "sdpa"
    assert st["active"] == ["mma"] and st["hooks_attached"]
    P.detach(model)
    assert not P.status(model)["hooks_attached"]


# ------------------------------------------------------------------------------------------- config


def test_config_round_trip_and_json():
    cfg = PatchConfig(mma=MMAConfig(assistant_token_ids=[4, 7], modalities=["image"]))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert PatchConfig.from_dict(data) == cfg
    assert PatchConfig.from_dict(None).active == () and PatchConfig.from_dict({}).active == ()


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"mma": {"assistant_token_ids": []}}, "non-empty"),
        ({"mma": {"assistant_token_ids": [-1]}}, "non-negative"),
        ({"mma": {"assistant_token_ids": 5}}, "sequence"),
        ({"mma": {"assistant_token_ids": [4], "modalities": ["audio"]}}, "modalities"),
        ({"mma": {"assistant_token_ids": [4], "bogus": 1}}, "unknown option"),
        ({"mma": {}}, "assistant_token_ids"),
        ({"no_such_patch": {"p": 0.6}}, "unknown patch"),
        ({"version": 99}, "version"),
        ({"mma": [4]}, "dict"),
    ],
)
def test_invalid_config_values(bad, match):
    with pytest.raises(HFKanConfigError, match=match):
        PatchConfig.from_dict(bad)


def test_apply_errors():
    model = V.shared("llava", "hf_kan")
    with pytest.raises(HFKanConfigError, match="outside the vocabulary"):
        P.apply(model, mma={"assistant_token_ids": [V.VOCAB + 3]})
    fresh = V.build("llava")
    with pytest.raises(HFKanConfigError, match="processor"):
        P.apply(fresh, mma=True)
    with pytest.raises(HFKanConfigError, match="mma must be"):
        P.apply(fresh, mma="yes")


def test_mma_with_flash_attention_is_refused():
    model = V.build("llava")
    # FlashAttention-2 cannot be loaded on this CPU machine; set the implementation name the way a CUDA load would.
    model.config.text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="flash_attention_2"):
        P.apply(model, mma=MMA)
    # and a model whose config already enables MMA refuses to run on flash_attention_2
    model = V.build("llava")
    P.apply(model, mma=MMA)
    model.config.text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="cannot express"):
        model(**V.make_inputs("llava", [V.standard_prompt(1)]))


def test_foreign_nonempty_cache_is_refused():
    from transformers import DynamicCache

    model = hf_kan_off("llava")
    inputs = V.make_inputs("llava", [V.standard_prompt(1)])
    sdpa_cache = V.shared("llava")(**inputs, cache=DynamicCache(config=model.config.text_config)).cache
    with pytest.raises(UnsupportedModelError, match="own cache"):
        model(input_ids=inputs["input_ids"][:, -1:], cache=sdpa_cache)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_save_and_load_restore_config_and_logits(family, tmp_path):
    model = V.build(family)
    P.apply(model, mma=MMA)
    inputs = V.make_inputs(family, PROMPTS, "left")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    cls = V.model_class(family)
    loaded = cls.from_pretrained(tmp_path, attn_implementation={"text_config": "hf_kan", "vision_config": "sdpa"})
    assert loaded.config.text_config.hf_kan == {"version": 1, **{"mma": MMA | {"modalities": ["image", "video"]}}}
    with pytest.raises(InputLayoutError, match="apply"):
        loaded(**inputs)  # config says MMA but the hook is not attached yet: never silently wrong
    P.apply(loaded)
    assert P.status(loaded)["active"] == ["mma"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-6)
    again = P.from_pretrained(cls, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- cache ledger


def test_layer_holding_a_subset_of_positions_decodes_correctly():
    """Layer 1's cache keeps a different subset of image positions per sample (batch 2, empty slots), layer 0 keeps
    everything; one decode step must equal sdpa with exactly those keys masked out in layer 1."""
    family = "llava"
    model, ref = hf_kan_off(family), V.shared(family)
    inputs = V.make_inputs(family, PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs)
    cache = out.cache
    length = inputs["input_ids"].shape[1]
    img_cols = [(inputs["input_ids"][b] == V.IMAGE).nonzero().flatten() for b in range(2)]
    dropped = [img_cols[0][::2].tolist(), img_cols[1][1:12:3].tolist()]  # 16 and 4 positions
    keep = [[p for p in range(length) if p not in d] for d in dropped]
    width = max(len(k) for k in keep)
    layer = cache.layers[1]
    held = torch.full((2, width), -1, dtype=torch.long)
    keys = torch.zeros(2, layer.keys.shape[1], width, layer.keys.shape[-1])
    values = torch.zeros_like(keys)
    for b in range(2):
        idx = torch.tensor(keep[b])
        held[b, : len(idx)] = idx
        keys[b, :, : len(idx)] = layer.keys[b, :, idx]
        values[b, :, : len(idx)] = layer.values[b, :, idx]
    layer.keys, layer.values = keys, values
    cache.ledger.set_layer(1, held)

    token = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    position_ids = inputs["attention_mask"].sum(-1, keepdim=True)
    with torch.no_grad():
        step = model(input_ids=token, attention_mask=mask, cache=cache, position_ids=position_ids).logits[:, -1]
    assert cache.layers[1].keys.shape[2] == width + 1 and cache.ledger.held[1].shape == (2, width + 1)

    allowed = mask.bool().clone()
    for b in range(2):
        allowed[b, dropped[b]] = False
    with torch.no_grad():
        ref_cache, unmasked_cache = ref(**inputs).cache, ref(**inputs).cache
        unmasked = ref(input_ids=token, attention_mask=mask, cache=unmasked_cache, position_ids=position_ids).logits
    hook = ref.model.language_model.layers[1].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: (args, {**kwargs, "attention_mask": allowed[:, None, None, :]}), with_kwargs=True
    )
    try:
        with torch.no_grad():
            expected = ref(input_ids=token, attention_mask=mask, cache=ref_cache, position_ids=position_ids).logits
    finally:
        hook.remove()
    torch.testing.assert_close(step, expected[:, -1], rtol=1e-5, atol=1e-5)
    assert (unmasked[:, -1] - expected[:, -1]).abs().max() > 1e-4  # the dropped keys did matter


def test_ledger_follows_beam_reordering_and_crop():
    model = hf_kan_off("llava")
    inputs = V.make_inputs("llava", PROMPTS, "left")
    with torch.no_grad():
        cache = model(**inputs).cache
    before = cache.ledger.tokens.modality.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.ledger.tokens.modality, before.flip(0))
    cache.crop(-3)
    assert cache.ledger.seen == before.shape[1] - 3 == cache.get_seq_length()


# ------------------------------------------------------------------------------------------- hook points


class _Recorder(PatchRuntime):
    """Test runtime: records the residual stream entering each layer and uses explicit probabilities on layer 1."""

    name = "recorder"
    uses_layer_hooks = True

    def __init__(self, store):
        super().__init__(None)
        self.store = store

    def before_layer(self, state, layer_idx, hidden_states, kwargs):
        self.store.setdefault("in", {})[layer_idx] = hidden_states.detach().clone()

    def after_layer(self, state, layer_idx, hidden_states):
        self.store.setdefault("out", {})[layer_idx] = hidden_states.detach().clone()

    def probs_transform(self, state, layer_idx):
        if layer_idx != 1:
            return None

        def check(probs, rows):
            self.store.setdefault("row_sums", []).append(probs.sum(-1))
            return probs

        return check


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_layer_hooks_see_the_residual_stream_and_explicit_probabilities_match(family):
    model = V.shared(family, "hf_kan")
    P.apply(model, mma=MMA)
    inputs = V.make_inputs(family, PROMPTS, "left")
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
    store = {}
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: kwargs["hf_kan_state"].add_runtime(_Recorder(store)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            hooked = model(**inputs)
    finally:
        handle.remove()
    for layer in range(2):
        torch.testing.assert_close(store["in"][layer], plain.hidden_states[layer], rtol=0, atol=0)
    torch.testing.assert_close(store["out"][0], plain.hidden_states[1], rtol=0, atol=0)
    valid = inputs["attention_mask"].bool()
    # layer 1 ran with explicit (float32, chunked) probabilities: rows sum to 1 and the logits are unchanged
    torch.testing.assert_close(store["row_sums"][0], torch.ones_like(store["row_sums"][0]))
    torch.testing.assert_close(hooked.logits[valid], plain.logits[valid], rtol=1e-5, atol=1e-5)


def test_explicit_attention_equals_sdpa_with_chunks():
    torch.manual_seed(0)

    class Mod:
        num_key_value_groups = 2

    q, k, v = torch.randn(2, 4, 37, 8), torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    mask = torch.rand(2, 1, 37, 37) > 0.3
    mask |= torch.eye(37, dtype=torch.bool)
    ref = sdpa_compute(Mod(), q, k, v, mask, 0.35, 0.0, False)
    out = explicit_attention(Mod(), q, k, v, mask, 0.35, transform=None, chunk_size=8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_without_hooks_hf_kan_equals_sdpa_through_the_mask_interface():
    """A model loaded with attn_implementation="hf_kan" everywhere (CLIP tower too) and no patches, never given the
    hooks: the registered mask builder keeps padding, so a padded batch still equals sdpa."""
    model = V.build("llava", "hf_kan")
    assert model.config.vision_config._attn_implementation == "hf_kan"
    inputs = V.make_inputs("llava", PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs).logits
        ref = V.shared("llava")(**inputs).logits
        P.apply(model)
        positional = model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"]).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(positional[valid], ref[valid], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mma", [False, MMA])
def test_multi_token_continuation_with_cache_equals_full_forward(mma):
    """A second forward of several tokens on top of a cache (1 < T < S: plain SDPA causality would be misaligned)."""
    model = V.shared("llava", "hf_kan")
    P.apply(model, mma=mma)
    inputs = V.make_inputs("llava", [V.standard_prompt(1)])
    extra = torch.tensor([[30, 31, 32]])
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], 1),
                attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 3, dtype=torch.long))
    with torch.no_grad():
        expected = model(**full).logits[:, -3:]
        cache = model(**inputs).cache
        got = model(input_ids=extra, attention_mask=full["attention_mask"], cache=cache).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
