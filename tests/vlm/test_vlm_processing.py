"""The Shapes VQA tokenizer and processor: vocabulary, chat template, round trips, the opener MMA derives, labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

import hf_kan  # noqa: F401
from hf_kan import patches
from hf_kan.data.shapes_vqa import QUESTION_TYPES, generate_shapes_vqa
from hf_kan.vlm.batches import IGNORE_INDEX, VQACollator, answer_labels
from hf_kan.vlm.modeling import VLMShape, build_vlm
from hf_kan.vlm.processing import (
    CHAT_TEMPLATE,
    build_processor,
    build_tokenizer,
    prompt_text,
    shapes_vqa_vocabulary,
    user_turn,
)

ROWS = list(generate_shapes_vqa(60, seed=11, question_types=QUESTION_TYPES + ("describe",)))


@pytest.fixture(scope="module")
def processor():
    return build_processor(image_size=48, patch_size=16)


def test_vocabulary_is_unique_and_covers_every_question_and_answer():
    vocab = shapes_vqa_vocabulary()
    assert len(vocab) == len(set(vocab))
    tokenizer = build_tokenizer()
    assert len(tokenizer) == len(vocab) and tokenizer.convert_tokens_to_ids(vocab) == list(range(len(vocab)))
    for row in generate_shapes_vqa(600, seed=2, question_types=QUESTION_TYPES + ("describe",)):
        text = f"{row['question']} {row['answer']}"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text  # word-level round trip


def test_chat_template_renders_llava_prompt_and_answer(processor):
    question = ROWS[0]["question"]
    assert prompt_text(processor, question) == f"<s>USER: <image> {question} ASSISTANT:"
    both = user_turn(question) + [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    assert processor.apply_chat_template(both) == f"<s>USER: <image> {question} ASSISTANT: red </s> "
    # string content renders the same as a text item
    plain = [{"role": "user", "content": f"<image> {question}"}]
    assert processor.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True) == \
        prompt_text(processor, question)


def test_processor_expands_image_and_round_trips_through_auto_processor(processor, tmp_path):
    texts = [prompt_text(processor, r["question"]) for r in ROWS[:3]]
    images = [r["image"] for r in ROWS[:3]]
    out = processor(images=images, text=texts, padding=True, return_tensors="pt")
    image_id = processor.tokenizer.image_token_id
    assert (out["input_ids"] == image_id).sum(-1).tolist() == [9, 9, 9]  # (48 / 16) ** 2 patches, class token dropped
    assert out["pixel_values"].shape == (3, 3, 48, 48)
    assert processor._get_num_multimodal_tokens(image_sizes=[[48, 48]]).num_image_tokens == [9]
    # the image processor leaves 48 px scenes unresized and uncropped: pixels are the normalised input
    expected = torch.from_numpy(np.asarray(images[0], dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (processor.image_processor.image_mean,
                                                         processor.image_processor.image_std))
    torch.testing.assert_close(out["pixel_values"][0], (expected - mean) / std, rtol=0, atol=1e-5)

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    again = loaded(images=images, text=texts, padding=True, return_tensors="pt")
    assert torch.equal(again["input_ids"], out["input_ids"]) and torch.equal(again["pixel_values"],
                                                                             out["pixel_values"])
    assert loaded.chat_template == CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer(texts[0])["input_ids"] == processor.tokenizer(texts[0])["input_ids"]
    assert tokenizer.image_token_id == image_id and tokenizer.chat_template == CHAT_TEMPLATE


def test_chat_template_yields_the_opener_mma_finds(processor):
    opener = processor.tokenizer.convert_tokens_to_ids("ASSISTANT:")
    model = build_vlm("kat", VLMShape(patch_size=16, vision_hidden_size=32, vision_layers=1, vision_heads=2,
                                      text_hidden_size=32, text_layers=1, text_heads=4, text_kv_heads=2),
                      processor.tokenizer)
    config = patches.apply(model, mma=True, processor=processor)
    assert config.mma.assistant_token_ids == (opener,)
    assert patches.status(model)["patches"]["mma"]["assistant_token_ids"] == [opener]
    # the opener is exactly what add_generation_prompt appends
    prompt = processor.tokenizer(prompt_text(processor, ROWS[0]["question"]))["input_ids"]
    assert prompt[-1] == opener and prompt.count(opener) == 1


def test_collator_labels_only_the_answer_and_eos(processor):
    collate = VQACollator(processor)
    batch = collate(ROWS[:6])
    tok = processor.tokenizer
    for b, row in enumerate(ROWS[:6]):
        labelled = batch["labels"][b][batch["labels"][b] != IGNORE_INDEX].tolist()
        assert tok.convert_ids_to_tokens(labelled) == row["answer"].split() + ["</s>"]
        valid = batch["attention_mask"][b].bool()
        assert valid[: int(valid.sum())].all()  # right padding
    with pytest.raises(ValueError, match="opener"):
        answer_labels(torch.tensor([[1, 2, 3]]), torch.ones(1, 3), opener_id=99)
