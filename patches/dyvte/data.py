"""Embedded default data of ``hf-kan dyvte-train``: a tiny random LLaVA and generated image/question/answer samples.

No real VLM or instruction data can be downloaded in hf-kan's test environment, so the default run is a smoke test
of the whole recipe on random weights, not a reproduction of the paper (which trains on 1% of LLaVA-665k):

- ``tiny_llava()``: a LLaVA-1.5-shaped model built from a config (CLIP tower, Llama decoder) with random weights;
- ``generate_samples(model, n)``: prompts ``<s> USER w.. <image> w.. ASSISTANT`` with random words and random-pixel
  images; each answer is the frozen model's own greedy continuation (so the full-image answer is what the model
  says, as with a real instruction-following model), marked in ``labels`` (``-100`` elsewhere).

A saved LLaVA-family model (``--model DIR``) gets the same kind of generated prompts, sized from its config.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError

IGNORE = -100
#: token ids of the tiny model's vocabulary
PAD, BOS, EOS, USER, ASSISTANT, IMAGE, FIRST_WORD = 0, 1, 2, 3, 4, 5, 10


def tiny_llava(num_layers: int = 4, hidden: int = 64, vocab: int = 128, image_size: int = 24, patch: int = 4,
               seed: int = 0) -> nn.Module:
    """A tiny random ``LlavaForConditionalGeneration`` (``(image_size / patch)^2`` image tokens), eval mode, CPU."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD,
                       bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_token_id=IMAGE, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def _llava_shape(model) -> tuple[int, int, int, int]:
    """(image token id, image tokens per image, image size, vocabulary size) of a LLaVA-1.5-style model."""
    if model.config.model_type != "llava":
        raise UnsupportedModelError(
            f"generated DyVTE training prompts are made for LLaVA-1.5-style models, not {model.config.model_type!r}; "
            "for other families call hf_kan.patches.dyvte.train.train_routers(model, loader) with your own batches "
            "(input_ids, attention_mask, image inputs, labels = answer tokens, -100 elsewhere)"
        )
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if model.config.vision_feature_select_strategy == "full":
        n += 1
    return model.config.image_token_id, n, vc.image_size, model.config.get_text_config().vocab_size


@torch.no_grad()
def generate_samples(model, n: int, answer_len: int = 4, seed: int = 0, batch_size: int = 8) -> list[dict]:
    """``n`` generated samples for ``model`` (LLaVA family): dicts with ``input_ids`` / ``labels`` ``(T,)`` (prompt +
    answer; ``labels`` = answer ids, ``-100`` on the prompt) and ``pixel_values`` ``(3, s, s)``. The answer is the
    model's greedy continuation of the prompt."""
    image_id, n_img, size, vocab = _llava_shape(model)
    text_cfg = model.config.get_text_config()
    specials = {image_id, text_cfg.pad_token_id, text_cfg.bos_token_id, text_cfg.eos_token_id}
    words = torch.tensor([i for i in range(FIRST_WORD, vocab) if i not in specials])
    gen = torch.Generator().manual_seed(seed)
    bos = text_cfg.bos_token_id if text_cfg.bos_token_id is not None else words[0].item()
    prompts, images = [], []
    for _ in range(n):
        before = words[torch.randint(len(words), (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen)]
        after = words[torch.randint(len(words), (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen)]
        ids = [bos, *before.tolist(), *([image_id] * n_img), *after.tolist()]
        prompts.append(torch.tensor(ids))
        images.append(torch.randn(3, size, size, generator=gen))
    samples = []
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        chunk = [{"input_ids": p, "pixel_values": im} for p, im in zip(prompts[start:start + batch_size],
                                                                      images[start:start + batch_size])]
        batch = collate(chunk, pad_id=text_cfg.pad_token_id or 0)
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        out = model.generate(**batch, max_new_tokens=answer_len, min_new_tokens=answer_len, do_sample=False,
                             suppress_tokens=sorted(i for i in specials if i is not None),
                             pad_token_id=text_cfg.pad_token_id)
        answers = out[:, batch["input_ids"].shape[1]:].cpu()
        for item, answer in zip(chunk, answers):
            ids = torch.cat([item["input_ids"], answer])
            labels = torch.cat([torch.full_like(item["input_ids"], IGNORE), answer])
            samples.append({"input_ids": ids, "labels": labels, "pixel_values": item["pixel_values"]})
    return samples


def collate(samples: list[dict], pad_id: int = PAD) -> dict:
    """Left-pad a list of samples into a batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on padding,
    if the samples have labels) and ``pixel_values`` stacked."""
    length = max(s["input_ids"].numel() for s in samples)
    b = len(samples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        n = s["input_ids"].numel()
        ids[i, length - n:] = s["input_ids"]
        mask[i, length - n:] = 1
        if "labels" in s:
            labels[i, length - n:] = s["labels"]
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack([s["pixel_values"] for s in samples])}
    if "labels" in samples[0]:
        out["labels"] = labels
    return out


__all__ = ["collate", "generate_samples", "tiny_llava"]
