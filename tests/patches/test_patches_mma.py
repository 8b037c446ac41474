"""Modality-mutual attention: the mask rule by hand, its effect on logits, the opener from a chat template (off ==
sdpa, padded batches, cached decoding and beam search: ``test_invariants.py``)."""

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


def test_mma_with_derived_opener():
    model = V.shared("llava", "hf_kan")
    cfg = P.apply(model, mma=True, tokenizer=V.chat_tokenizer())
    assert cfg.mma.assistant_token_ids == (V.ASSISTANT,)
    assert P.status(model)["patches"]["mma"] == {"assistant_token_ids": [V.ASSISTANT], "modalities": ["image", "video"]}

