"""Modality-mutual attention: the mask rule by hand, its effect on logits, cached decoding and padded batches."""

import pytest
import torch
import vlm_models as V
from hf_kan.patches.engine.layout import IMAGE, VisualItem, build_layout
from hf_kan.patches.engine.masks import base_mask
from hf_kan.patches.mma.runtime import mma_rule, with_assistant_spans

import hf_kan  # noqa: F401
from hf_kan import patches as P

MMA = {"assistant_token_ids": [V.ASSISTANT]}


def _mask(input_ids, attention_mask, image_cols, opener=(V.ASSISTANT,)):
    items = []
    for b, cols in enumerate(image_cols):
        if cols:
            n = len(cols)
            zeros = torch.zeros(n, dtype=torch.long)
            items.append(VisualItem(b, cols[0], IMAGE, zeros, zeros, torch.arange(n), torch.zeros(n, dtype=torch.bool)))
    ids = torch.tensor(input_ids)
    lay = build_layout(ids, None if attention_mask is None else torch.tensor(attention_mask), items)
    lay = with_assistant_spans(lay, ids, opener)
    return mma_rule(lay, lay, base_mask(lay, lay)).int().tolist()


def test_mma_mask_written_out_by_hand():
    # columns: 0 text, 1 text, 2 image, 3 image, 4 text, 5 ASSISTANT (opener), 6 generated text
    got = _mask([[1, 10, V.IMAGE, V.IMAGE, 11, V.ASSISTANT, 12]], None, [[2, 3]])
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 1, 1, 0],  # first image token: later text up to the opener, not the later image token
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 0],  # text stays causal
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],  # text after the opener: causal; never visible to image tokens
    ]
    assert got[0] == expected


def test_mma_mask_with_padding_by_hand():
    # sample 0 left-padded: pad, text, image, opener; sample 1: text, text, image, opener
    got = _mask([[0, 10, V.IMAGE, V.ASSISTANT], [10, 11, V.IMAGE, V.ASSISTANT]], [[0, 1, 1, 1], [1, 1, 1, 1]],
                [[2], [2]])
    assert got[0] == [
        [1, 0, 0, 0],  # a padding query sees only itself (no empty rows)
        [0, 1, 0, 0],  # padding keys are hidden
        [0, 1, 1, 1],
        [0, 1, 1, 1],
    ]
    assert got[1] == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


def _set(model, mma):
    P.apply(model, mma=mma)
    return model


@pytest.mark.parametrize("family", V.FAMILIES)
def test_mma_keeps_prefix_and_changes_image_positions(family):
    ref = V.shared(family)
    model = _set(V.shared(family, "hf_kan"), MMA)
    inputs = V.make_inputs(family, [V.standard_prompt(1, before=3)])
    with torch.no_grad():
        a, b = ref(**inputs).logits[0], model(**inputs).logits[0]
    ids = inputs["input_ids"][0]
    first = int((ids == V.IMAGE).nonzero()[0])
    torch.testing.assert_close(b[:first], a[:first], rtol=0, atol=1e-6)
    assert (b[ids == V.IMAGE] - a[ids == V.IMAGE]).abs().amax(-1).min() > 1e-4  # every image position changes


@pytest.mark.parametrize("family", V.FAMILIES)
def test_mma_cached_generate_equals_full_forward(family):
    model = _set(V.shared(family, "hf_kan"), MMA)
    inputs = V.make_inputs(family, [V.standard_prompt(2), V.standard_prompt(1, before=4)], "left")
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=V.SUPPRESS, return_dict_in_generate=True,
              output_logits=True)
    cached = model.generate(**inputs, **kw)
    full = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    for x, y in zip(cached.logits, full.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # and a single full forward over prompt + generated tokens gives the same last-step logits
    seq = cached.sequences
    full_inputs = dict(inputs)
    full_inputs["input_ids"] = seq
    new = torch.ones_like(seq[:, inputs["input_ids"].shape[1]:])
    full_inputs["attention_mask"] = torch.cat([inputs["attention_mask"], new], 1)
    if "mm_token_type_ids" in inputs:
        full_inputs["mm_token_type_ids"] = (seq == V.IMAGE).int()
    with torch.no_grad():
        logits = model(**full_inputs).logits
    torch.testing.assert_close(logits[:, -2], cached.logits[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", V.FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_mma_padded_batch_equals_each_sample_alone(family, side):
    model = _set(V.shared(family, "hf_kan"), MMA)
    prompts = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]
    inputs = V.make_inputs(family, prompts, side)
    with torch.no_grad():
        batch = model(**inputs).logits
        for b in range(2):
            alone = model(**V.sample_inputs(family, inputs, b)).logits[0]
            valid = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(batch[b][valid], alone, rtol=1e-5, atol=1e-5)


def test_mma_with_derived_opener_and_video_modalities_option():
    model = V.shared("llava", "hf_kan")
    cfg = P.apply(model, mma=True, tokenizer=V.chat_tokenizer())
    assert cfg.mma.assistant_token_ids == (V.ASSISTANT,)
    assert P.status(model)["patches"]["mma"] == {"assistant_token_ids": [V.ASSISTANT], "modalities": ["image", "video"]}
    # restricting MMA to video leaves an image-only model exactly causal
    P.apply(model, mma={"assistant_token_ids": [V.ASSISTANT], "modalities": ["video"]})
    inputs = V.make_inputs("llava", [V.standard_prompt(1)])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, V.shared("llava")(**inputs).logits, rtol=0, atol=1e-6)


def test_mma_beam_search_cached_equals_uncached():
    model = _set(V.shared("llava", "hf_kan"), MMA)
    inputs = V.make_inputs("llava", [V.standard_prompt(2), V.standard_prompt(1, before=4)], "left")
    kw = dict(max_new_tokens=3, do_sample=False, suppress_tokens=V.SUPPRESS, num_beams=3, num_return_sequences=2)
    assert torch.equal(model.generate(**inputs, **kw), model.generate(**inputs, use_cache=False, **kw))
