"""TokenLayout from each family's adapter: modality, grids, multi-image spans, padding, LLaVA-NeXT newlines."""

import pytest
import torch
import vlm_models as V
from hf_kan.patches.engine import IMAGE, PAD, TEXT, VIDEO
from hf_kan.patches.engine.layout import build_layout
from hf_kan.patches.families import adapter_for
from hf_kan.patches.mma.chat_template import assistant_opener_ids
from hf_kan.patches.mma.runtime import with_assistant_spans

import hf_kan  # noqa: F401
from hf_kan.errors import HFKanConfigError, InputLayoutError, UnsupportedModelError


def layout_of(family, inputs, opener=(V.ASSISTANT,)):
    model = V.shared(family)
    items = adapter_for(model).visual_items(model, inputs["input_ids"], dict(inputs))
    return with_assistant_spans(build_layout(inputs["input_ids"], inputs["attention_mask"], items), inputs["input_ids"],
                                opener)


def test_llava_single_image_layout_by_hand():
    inputs = V.make_inputs("llava", [[V.BOS, V.USER, 10, V.IMG, 20, 21, V.ASSISTANT]])
    lay = layout_of("llava", inputs)
    mod = lay.modality[0].tolist()
    assert mod == [TEXT] * 3 + [IMAGE] * 16 + [TEXT] * 3
    img = slice(3, 19)
    assert lay.row[0, img].tolist() == [r for r in range(4) for _ in range(4)]
    assert lay.col[0, img].tolist() == list(range(4)) * 4
    assert lay.image_index[0, img].tolist() == [0] * 16 and lay.image_index[0, :3].tolist() == [-1] * 3
    # image tokens may see up to the ASSISTANT token (column 21); everything else only itself
    assert lay.span_end[0, img].tolist() == [21] * 16
    assert lay.span_end[0, :3].tolist() == [0, 1, 2] and lay.span_end[0, 19:].tolist() == [19, 20, 21]
    assert lay.position[0].tolist() == list(range(22))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_multi_image_spans_and_padding(family, side):
    prompts = [V.standard_prompt(2, before=1, after=2), V.standard_prompt(1, before=3, after=2)]
    inputs = V.make_inputs(family, prompts, side)
    lay = layout_of(family, inputs)
    ids = inputs["input_ids"]
    for b, n_images in enumerate([2, 1]):
        valid = inputs["attention_mask"][b].bool()
        assert ((lay.modality[b] == PAD) == ~valid).all()
        opener_col = int((ids[b] == V.ASSISTANT).nonzero().item())
        img = lay.modality[b] == IMAGE
        assert torch.equal(img, ids[b] == V.IMAGE)
        assert sorted(set(lay.image_index[b][img].tolist())) == list(range(n_images))
        # every image (the first one too) sees the prompt up to and including the assistant opener
        assert (lay.span_end[b][img] == opener_col).all()
        assert torch.equal(lay.span_end[b][~img], lay.position[b][~img])
        # image k's tokens form one contiguous run, after image k-1's
        starts = [int((lay.image_index[b] == k).nonzero()[0]) for k in range(n_images)]
        assert starts == sorted(starts)


def test_qwen_grid_from_grid_thw_and_from_mrope_positions():
    family = "qwen2_vl"
    inputs = V.make_inputs(family, [V.standard_prompt(2)])  # grids (1,4,6) -> 2x3 and (1,4,4) -> 2x2
    lay = layout_of(family, inputs)
    first = lay.image_index[0] == 0
    assert lay.row[0][first].tolist() == [0, 0, 0, 1, 1, 1] and lay.col[0][first].tolist() == [0, 1, 2] * 2
    second = lay.image_index[0] == 1
    assert lay.row[0][second].tolist() == [0, 0, 1, 1] and lay.col[0][second].tolist() == [0, 1, 0, 1]
    # inside generate the grids are gone; the M-RoPE position ids give the same coordinates
    model = V.shared(family)
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"],
                                        attention_mask=inputs["attention_mask"])
    gen_inputs = {"input_ids": inputs["input_ids"], "position_ids": pos, "mm_encoder_outputs": {"image": None}}
    items = adapter_for(model).visual_items(model, inputs["input_ids"], gen_inputs)
    lay2 = build_layout(inputs["input_ids"], inputs["attention_mask"], items)
    assert torch.equal(lay2.row, lay.row) and torch.equal(lay2.col, lay.col)


def test_llava_next_newlines_and_grids_from_sizes_and_from_features():
    family = "llava_next"
    inputs = V.make_inputs(family, [V.standard_prompt(1)])  # image 20x30 px
    lay = layout_of(family, inputs)
    img = lay.modality[0] == IMAGE
    base = img & (lay.grid[0] == 0)
    high = img & (lay.grid[0] == 1)
    assert int(base.sum()) == 16
    # 20x30 (h x w) -> pinpoint 32x32 -> 2x2 tiles -> 8x8 patches; unpadding to the 2:3 aspect keeps rows 1..6,
    # so 6 rows of 8 tokens, each followed by a newline token
    nl = lay.newline[0]
    assert int(high.sum()) == 6 * 9 and int(nl.sum()) == 6
    assert lay.row[0][nl].tolist() == list(range(6)) and (lay.col[0][nl] == -1).all()
    assert lay.col[0][high & ~nl].tolist() == list(range(8)) * 6
    assert lay.row[0][high & ~nl].tolist() == [r for r in range(6) for _ in range(8)]
    # generate() passes pre-computed features instead of image_sizes: newline rows are found in them
    model = V.shared(family)
    feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    gen_inputs = {"mm_encoder_outputs": {"image": feats}}
    items = adapter_for(model).visual_items(model, inputs["input_ids"], gen_inputs)
    lay2 = build_layout(inputs["input_ids"], inputs["attention_mask"], items)
    for name in ("grid", "row", "col", "newline", "modality"):
        assert torch.equal(getattr(lay2, name), getattr(lay, name)), name


def test_image_token_count_mismatch_raises_project_error():
    for family in V.FAMILIES:
        inputs = V.make_inputs(family, [V.standard_prompt(1)])
        ids = inputs["input_ids"].clone()
        col = int((ids[0] == V.IMAGE).nonzero()[0])
        inputs["input_ids"] = torch.cat([ids[:, :col], ids[:, col + 1:]], 1)  # one image token short
        inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == V.IMAGE).int()
        with pytest.raises(InputLayoutError, match="image"):
            layout_of(family, inputs)


def test_unsupported_family():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(V._llama_text())
    with pytest.raises(UnsupportedModelError, match="llama"):
        adapter_for(model)


def test_assistant_opener_from_chat_template():
    tok = V.chat_tokenizer()
    assert assistant_opener_ids(tok) == (V.ASSISTANT,)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(HFKanConfigError, match="assistant"):
        assistant_opener_ids(tok)


def test_qwen_video_frames():
    model = V.shared("qwen2_vl")
    ids = torch.tensor([[V.BOS, 10, V.VSTART] + [V.VIDEO] * 8 + [V.VEND, 11, V.ASSISTANT]])
    inputs = {"input_ids": ids, "video_grid_thw": torch.tensor([[2, 4, 4]]), "pixel_values_videos": torch.zeros(1)}
    items = adapter_for(model).visual_items(model, ids, inputs)
    lay = with_assistant_spans(build_layout(ids, None, items), ids, (V.ASSISTANT,))
    vid = slice(3, 11)
    assert lay.modality[0, vid].tolist() == [VIDEO] * 8
    assert lay.grid[0, vid].tolist() == [0] * 4 + [1] * 4  # temporal index
    assert lay.row[0, vid].tolist() == [0, 0, 1, 1] * 2 and lay.col[0, vid].tolist() == [0, 1, 0, 1] * 2
    assert (lay.span_end[0, vid] == 13).all()
    with pytest.raises(InputLayoutError, match="video"):
        adapter_for(model).visual_items(model, ids, {**inputs, "video_grid_thw": torch.tensor([[2, 4, 6]])})
