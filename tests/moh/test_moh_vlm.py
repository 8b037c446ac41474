"""MoH on the language model of tiny LLaVA and Qwen2-VL models (default target modules from the model type)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import hf_kan  # noqa: F401  (registers MoH)
from hf_kan.moh import MoHConfig, MoHLayer

IMAGE, VOCAB = 5, 64
TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def tiny_llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_id=IMAGE, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config)


def tiny_qwen2_vl() -> Qwen2VLForConditionalGeneration:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    config = Qwen2VLConfig(
        text_config=dict(**TEXT, rope_parameters=rope),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=IMAGE, video_token_id=6, vision_start_token_id=7, vision_end_token_id=8,
        tie_word_embeddings=False,
    )
    return Qwen2VLForConditionalGeneration(config)


def llava_inputs() -> dict:
    # one image (4 x 4 patches -> 16 image tokens after dropping CLS) between text tokens, batch of 2
    text = torch.randint(10, VOCAB, (2, 6))
    ids = torch.cat([text[:, :2], torch.full((2, 16), IMAGE), text[:, 2:]], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16)}


def qwen_inputs() -> dict:
    return {"input_ids": torch.randint(10, VOCAB, (2, 9))}


FAMILIES = {"llava": (tiny_llava, llava_inputs), "qwen2_vl": (tiny_qwen2_vl, qwen_inputs)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("router", ["query_norm", "learned"])
def test_moh_wraps_language_model_only_and_round_trips(tmp_path, family, router):
    build, make_inputs = FAMILIES[family]
    torch.manual_seed(0)
    base = build().eval()
    reference = copy.deepcopy(base)
    inputs = make_inputs()
    expected_base = reference(**inputs).logits

    model = get_peft_model(base, MoHConfig(router=router, router_init_std=0.5))
    names = [n for n, m in model.named_modules() if isinstance(m, MoHLayer)]
    assert len(names) == TEXT["num_hidden_layers"]
    assert all(".language_model.layers." in n and n.endswith("self_attn.o_proj") for n in names)

    out = model(**inputs).logits
    assert not torch.allclose(out, expected_base, atol=1e-4), "MoH (1 of 4 heads gated off per token) changes logits"
    with model.disable_adapter():
        assert torch.equal(model(**inputs).logits, expected_base)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, tmp_path)
    assert torch.equal(loaded(**inputs).logits, out)


def test_all_heads_active_equals_base_on_llava():
    torch.manual_seed(0)
    base = tiny_llava().eval()
    inputs = llava_inputs()
    expected = copy.deepcopy(base)(**inputs).logits
    model = get_peft_model(base, MoHConfig(router="query_norm", active_fraction=1.0))
    assert torch.equal(model(**inputs).logits, expected)


def test_moh_composes_with_hf_kan_attention_implementation():
    torch.manual_seed(0)
    sdpa = tiny_llava().eval()
    hf_kan_attn = copy.deepcopy(sdpa)
    hf_kan_attn.set_attn_implementation({"text_config": "hf_kan", "vision_config": "sdpa"})
    inputs = llava_inputs()
    outs = []
    for base in (sdpa, hf_kan_attn):
        model = get_peft_model(base, MoHConfig(router="learned", router_init_std=0.5))
        torch.manual_seed(1)
        with torch.no_grad():
            for layer in (m for m in model.modules() if isinstance(m, MoHLayer)):
                layer.moh_router["default"].proj.weight.normal_(std=0.5)
        outs.append(model(**inputs).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)



def _tiny_text_and_vlm_models():
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
        MistralForCausalLM,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4, projection_dim=32)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    return {
        "mistral": lambda: MistralForCausalLM(MistralConfig(**TEXT)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TEXT)),
        "llava_next": lambda: LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
            image_grid_pinpoints=[[16, 32]], tie_word_embeddings=False)),
        "qwen2_5_vl": lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(**TEXT, rope_parameters=rope),
            vision_config=dict(depth=1, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2,
                               patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            image_token_id=IMAGE, video_token_id=6, vision_start_token_id=7, vision_end_token_id=8,
            tie_word_embeddings=False)),
    }


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "llava_next", "qwen2_5_vl"])
def test_default_targets_for_other_model_types(model_type):
    torch.manual_seed(0)
    base = _tiny_text_and_vlm_models()[model_type]().eval()
    assert base.config.model_type == model_type
    ids = torch.randint(10, VOCAB, (2, 7))
    expected = copy.deepcopy(base)(input_ids=ids).logits
    model = get_peft_model(base, MoHConfig(router="query_norm"))
    names = [n for n, m in model.named_modules() if isinstance(m, MoHLayer)]
    assert len(names) == TEXT["num_hidden_layers"] and all(n.endswith("self_attn.o_proj") for n in names)
    assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_head_skipping_composes_with_hf_kan_backend_and_falls_back_under_patches(monkeypatch):
    from hf_kan import patches
    from hf_kan.moh import skip

    monkeypatch.setattr(skip, "MIN_DECODE_SKIPPED", 0)  # tiny prompts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the decode rule depends on the thread count (see test_moh_skip.py)
    try:
        _check_hf_kan_backend_and_patches(monkeypatch, skip, patches)
    finally:
        torch.set_num_threads(threads)


def _check_hf_kan_backend_and_patches(monkeypatch, skip, patches):
    taken: list[bool] = []
    original = skip.skipped_head_attention

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(skip, "skipped_head_attention", spy)
    torch.manual_seed(0)
    base = tiny_llava().eval()
    base.set_attn_implementation({"text_config": "hf_kan", "vision_config": "sdpa"})
    inputs = llava_inputs()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE], output_logits=True,
              return_dict_in_generate=True)
    # 4 heads in 2 GQA groups, active_fraction 0.5: the routed group is off for every token, so the prefill and every
    # decode step skip it
    models = {s: get_peft_model(copy.deepcopy(base), MoHConfig(active_fraction=0.5, skip_inactive_heads=s)).eval()
              for s in (True, False)}
    with torch.no_grad():
        out = {s: m.generate(**inputs, **kw) for s, m in models.items()}
    assert taken == [True] * 4 * TEXT["num_hidden_layers"], "prefill + 3 decode steps, every layer"
    assert torch.equal(out[True].sequences, out[False].sequences)
    for a, b in zip(out[True].logits, out[False].logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # with an hf_kan patch on, the backend builds its own masks from token metadata: MoH takes the dense gated path
    for model in models.values():
        patches.apply(model.base_model.model, mma={"assistant_token_ids": [9]})
    taken.clear()
    with torch.no_grad():
        out = {s: m.generate(**inputs, **kw) for s, m in models.items()}
    assert taken == []
    assert torch.equal(out[True].sequences, out[False].sequences)
    for a, b in zip(out[True].logits, out[False].logits):
        assert torch.equal(a, b)
