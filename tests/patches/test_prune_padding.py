"""Padding suppression measured from the ORIGINAL image sizes, through the real ``LlavaProcessor`` with
expand-to-square (``do_pad=True``), on images of several aspect ratios: the padding table equals an independent
per-patch intersection computed from width and height (as the authors' pad mask is), the pixel fallback under-counts,
and the debiased keep sets of a forward and of ``generate`` equal a reference built from the original sizes.

Model: a tiny LLaVA with 56 px images and 4 px patches (a 14 x 14 grid, 196 image tokens) and 3 decoder layers."""

import numpy as np
import pytest
import torch
import vlm_models as V
from hf_kan.patches.prune.debias import image_padding_fractions, size_padding_fractions
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError, InputLayoutError

SIDE, PATCH = 56, 4
GRID = SIDE // PATCH
#: (width, height): wide, tall, square, very wide, slightly tall
SIZES = [(210, 95), (75, 175), (125, 125), (250, 83), (90, 120)]
PROMPT = "USER: <image> w10 w11 ASSISTANT:"


@pytest.fixture(scope="module")
def setup():
    config = LlavaConfig(vision_config=V._clip(image_size=SIDE, patch=PATCH), text_config=V._llama_text(3),
                         vision_feature_layer=-1, vision_feature_select_strategy="default", image_token_id=V.IMAGE,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="hf_kan").eval()
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": SIDE},
                                               crop_size={"height": SIDE, "width": SIDE}),
        tokenizer=V.chat_tokenizer(), patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    inputs = dict(processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True))
    return model, images, inputs


def reference_fractions(width: int, height: int) -> torch.Tensor:
    """Per patch, 1 - (area of the patch inside the pasted image) / (patch area), in pixels of the resized square:
    the image sits at the processor's integer paste offset on a max(w, h) square that is resized to SIDE."""
    side = max(width, height)
    scale = SIDE / side
    left, top = (side - width) // 2 * scale, (side - height) // 2 * scale
    right, bottom = left + width * scale, top + height * scale
    out = torch.zeros(GRID, GRID, dtype=torch.float64)
    for r in range(GRID):
        for c in range(GRID):
            x0, y0 = c * PATCH, r * PATCH
            inside_w = max(0.0, min(x0 + PATCH, right) - max(x0, left))
            inside_h = max(0.0, min(y0 + PATCH, bottom) - max(y0, top))
            out[r, c] = 1 - inside_w * inside_h / PATCH**2
    return out


def test_padding_from_original_sizes_equals_the_geometry_and_the_pixels_undercount(setup):
    model, images, inputs = setup
    assert inputs["pixel_values"].shape[-1] == SIDE and int((inputs["input_ids"] == V.IMAGE).sum(1)[0]) == GRID**2
    table = P.padding_cache(model, images=images).hf_kan_image_padding
    assert table.source == "image_sizes"
    for k, (w, h) in enumerate(SIZES):
        torch.testing.assert_close(table.fractions[k].double(), reference_fractions(w, h), rtol=0, atol=1e-6)
    sizes = torch.tensor([(h, w) for w, h in SIZES])
    torch.testing.assert_close(P.padding_cache(model, image_sizes=sizes).hf_kan_image_padding.fractions,
                               table.fractions)
    from_pixels = P.padding_cache(model, inputs["pixel_values"]).hf_kan_image_padding
    assert from_pixels.source == "pixels"
    suppressed = (table.fractions > 0.5).sum((1, 2))
    assert suppressed.tolist() == [112, 112, 0, 140, 56]
    # after the bicubic resize the inner edge of each band reads as real: one grid row / column per band too few
    assert ((from_pixels.fractions > 0.5).sum((1, 2)) < suppressed).sum() == 4


def test_the_readme_example_840x380_at_336_px():
    """LLaVA-1.5's geometry (336 px, 14 px patches): 336 padding tokens by size, 288 read from the pixels."""
    processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336},
                                       crop_size={"height": 336, "width": 336})
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (380, 840, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert int((size_padding_fractions([(380, 840)], 24) > 0.5).sum()) == 336
    assert int((image_padding_fractions(pixels, 14) > 0.5).sum()) == 288


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_debiased_keep_sets_follow_the_original_sizes(setup, ratio):
    model, images, inputs = setup
    P.apply(model, prune={"layers": [2], "keep_ratios": [ratio], "debias": True})
    with torch.no_grad():
        out = model(**inputs, cache=P.padding_cache(model, images=images))
        plain = model(**inputs)
    record = out.hf_kan_state.scratch["prune"]
    assert record["padding_source"] == "image_sizes"
    assert plain.hf_kan_state.scratch["prune"]["padding_source"] == "pixels"  # the fallback
    ids, kept = inputs["input_ids"], record["kept"][0]
    for b, (w, h) in enumerate(SIZES):
        visual = (ids[b] == V.IMAGE).nonzero().flatten()
        score = record["scores"][0][b, visual]  # un-debiased votes, raster order
        pad = reference_fractions(w, h).flatten() > 0.5
        count = min(int(ratio * GRID**2 + 0.5), int((~pad).sum()))
        real = (~pad).nonzero().flatten()
        expected = visual[real[score[real].topk(count).indices]].sort().values
        got = kept[b][kept[b] >= 0]
        assert got[ids[b, got] == V.IMAGE].tolist() == expected.tolist()
    differs = [not torch.equal(a, b) for a, b in zip(kept, plain.hf_kan_state.scratch["prune"]["kept"][0])]
    assert any(differs)  # the pixel fallback keeps padding tokens the sizes suppress
    gen = model.generate(**inputs, cache=P.padding_cache(model, images=images), max_new_tokens=1, do_sample=False,
                         suppress_tokens=V.SUPPRESS, return_dict_in_generate=True)
    assert torch.equal(gen.cache.hf_kan_prefill_state.scratch["prune"]["kept"][0], kept)


def test_padding_cache_errors(setup):
    model, images, inputs = setup
    with pytest.raises(HFKanConfigError, match="exactly one"):
        P.padding_cache(model)
    with pytest.raises(HFKanConfigError, match="exactly one"):
        P.padding_cache(model, inputs["pixel_values"], images=images)
    with pytest.raises(InputLayoutError, match="height, width"):
        P.padding_cache(model, image_sizes=[(10.5, 3)])
    with pytest.raises(HFKanConfigError, match="do not pad"):
        P.padding_cache(V.shared("qwen2_vl"), image_sizes=[(10, 20)])
    P.apply(model, prune={"layers": [2], "keep_ratios": [0.5], "debias": True})
    with pytest.raises(InputLayoutError, match="image"):  # sizes of fewer images than the batch holds
        with torch.no_grad():
            model(**inputs, cache=P.padding_cache(model, images=images[:2]))
