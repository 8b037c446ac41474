"""The KAT-tower LLaVA: built through the Auto classes, engine invariants under attn_implementation="hf_kan" with
patches off and with MMA (padded batch == alone, cached decoding == recompute), save/load, the ViT twin."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

import hf_kan  # noqa: F401
from hf_kan import patches
from hf_kan.data.shapes_vqa import generate_shapes_vqa
from hf_kan.models.kat import KATModel
from hf_kan.vlm.modeling import VLMShape, build_vlm, vlm_config
from hf_kan.vlm.processing import build_processor, prompt_text

SHAPE = VLMShape(patch_size=16, vision_hidden_size=32, vision_layers=1, vision_heads=2, text_hidden_size=32,
                 text_layers=3, text_heads=4, text_kv_heads=2)
ROWS = list(generate_shapes_vqa(3, seed=4))


@pytest.fixture(scope="module")
def processor():
    return build_processor(SHAPE.image_size, SHAPE.patch_size)


def _model(processor, impl="hf_kan", tower="kat"):
    torch.manual_seed(0)
    model = build_vlm(tower, SHAPE, processor.tokenizer, attn_implementation=impl).eval()
    with torch.no_grad():  # sharpen the random attention so masks visibly change the outputs
        for name, param in model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(6.0)
    return model


def _inputs(processor, side="left", rows=ROWS):
    texts = [prompt_text(processor, r["question"]) for r in rows]
    return processor(images=[r["image"] for r in rows], text=texts, padding=True, padding_side=side,
                     return_tensors="pt")


def _alone(inputs, b):
    valid = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b][valid][None], "attention_mask": torch.ones(1, int(valid.sum()),
                                                                                             dtype=torch.long),
            "pixel_values": inputs["pixel_values"][b:b + 1]}


def test_kat_tower_is_the_registered_backbone_and_the_vit_twin_has_the_same_size(processor):
    kat, vit = _model(processor), _model(processor, tower="vit")
    assert isinstance(kat.model.vision_tower, KATModel)
    assert vlm_config("kat", SHAPE, processor.tokenizer).vision_config.model_type == "kat"
    assert type(vit.model.vision_tower).__name__ == "CLIPVisionModel"
    n_kat, n_vit = (sum(p.numel() for p in m.parameters()) for m in (kat, vit))
    assert abs(n_kat - n_vit) / n_kat < 0.01
    # same text model and projector shapes
    assert {k: v.shape for k, v in kat.state_dict().items() if "vision_tower" not in k} == {
        k: v.shape for k, v in vit.state_dict().items() if "vision_tower" not in k}


def test_hf_kan_with_patches_off_matches_sdpa(processor):
    inputs = _inputs(processor)
    with torch.no_grad():
        ref = _model(processor, "sdpa")(**inputs).logits
        got = _model(processor)(**inputs).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mma", [False, True], ids=["off", "mma"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(processor, mma, side):
    model = _model(processor)
    patches.apply(model, mma=mma, processor=processor)
    inputs = _inputs(processor, side)
    assert inputs["attention_mask"].sum(-1).unique().numel() > 1  # the questions differ in length
    with torch.no_grad():
        batch = model(**inputs).logits
        for b in range(len(ROWS)):
            alone = model(**_alone(inputs, b)).logits[0]
            torch.testing.assert_close(batch[b][inputs["attention_mask"][b].bool()], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mma", [False, True], ids=["off", "mma"])
def test_cached_decoding_equals_recompute(processor, mma):
    model = _model(processor)
    patches.apply(model, mma=mma, processor=processor)
    inputs = _inputs(processor)
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
              suppress_tokens=[processor.tokenizer.image_token_id])
    cached = model.generate(**inputs, **kw)
    full = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    for x, y in zip(cached.logits, full.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    seq = cached.sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, inputs["input_ids"].shape[1]:])], 1)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(logits[:, -2], cached.logits[-1], rtol=1e-5, atol=1e-5)


def test_mma_changes_image_positions_only(processor):
    plain, mma = _model(processor), _model(processor)
    patches.apply(mma, mma=True, processor=processor)
    inputs = _alone(_inputs(processor), 0)
    with torch.no_grad():
        a, b = plain(**inputs).logits[0], mma(**inputs).logits[0]
    image = inputs["input_ids"][0] == processor.tokenizer.image_token_id
    first = int(image.nonzero()[0])
    torch.testing.assert_close(b[:first], a[:first], rtol=0, atol=1e-6)
    assert (b[image] - a[image]).abs().amax(-1).min() > 1e-4
    assert (b[-1] - a[-1]).abs().max() > 1e-4  # the answer position reads image states that saw the question


def test_save_and_load_through_the_auto_class(processor, tmp_path):
    model = _model(processor, "sdpa")
    model.save_pretrained(tmp_path / "plain")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "plain")
    assert isinstance(loaded, LlavaForConditionalGeneration)
    inputs = _inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)

    patched = _model(processor)
    patches.apply(patched, mma=True, processor=processor)
    patched.save_pretrained(tmp_path / "mma")
    restored = patches.from_pretrained(LlavaForConditionalGeneration, tmp_path / "mma").eval()
    assert patches.status(restored)["active"] == ["mma"]
    with torch.no_grad():
        torch.testing.assert_close(restored(**inputs).logits, patched(**inputs).logits, rtol=0, atol=0)
