"""Tiny random vision-language models and inputs for the four families the patches support.

Reusable by every patch test (MMA, pruning, DyVTE, VAR). Each family is one small ``Family`` spec in
``FAMILY_SPECS`` (config, model class, image placeholders, pixels); adding a family adds one spec.
``build(family, attn_implementation=...)`` returns a tiny model built from a config (random weights, CPU), and
``make_inputs(family, prompts)`` builds a batch of model inputs from a list of prompts written as token lists, where
the string ``"<image>"`` stands for one image (expanded into the right number of image tokens for that family) and
the integers are text token ids. Samples of unequal length are
padded on the ``padding_side`` given. Every prompt ends with the assistant-turn opener ``ASSISTANT`` so MMA has a
boundary to find.

Token ids (shared by all families): 0 pad, 1 bos, 2 eos, 3 ``USER``, 4 ``ASSISTANT``, 5 image, 6 video,
7 vision-start, 8 vision-end, 9 image-newline (unused as a token id; LLaVA-NeXT newlines are image tokens),
10.. ordinary words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

PAD, BOS, EOS, USER, ASSISTANT, IMAGE, VIDEO, VSTART, VEND = 0, 1, 2, 3, 4, 5, 6, 7, 8
VOCAB = 64
IMG = "<image>"

# LLaVA: 16 px images, patch 4 -> a 4 x 4 grid of 16 tokens per image.
LLAVA_GRID = 4
# LLaVA-NeXT: base 16 px / patch 4 -> 4 x 4; pinpoints up to 32 px -> up to 2 x 2 tiles of 4 x 4 patches each.
NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
# Qwen: patch 4, merge 2. The default image is 16 x 24 px -> grid_thw (1, 4, 6) -> 2 x 3 = 6 tokens.
QWEN_PATCH, QWEN_MERGE, QWEN_TPATCH = 4, 2, 2


def _llama_text(num_layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )


def _mistral_text(num_layers: int = 2, hidden: int = 32, sliding_window: int = 8) -> MistralConfig:
    """A Mistral text config: every layer attends within ``sliding_window`` positions (no ``layer_types``)."""
    return MistralConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, sliding_window=sliding_window,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )


def _clip(image_size: int = 16, patch: int = 4, hidden: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=hidden,
    )


def _qwen_text(num_layers: int = 2, hidden: int = 32) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )


def _llava_config(config_class, text=_llama_text, **extra):
    def config(num_layers: int):
        return config_class(vision_config=_clip(), text_config=text(num_layers), vision_feature_layer=-1,
                            vision_feature_select_strategy="default", image_token_id=IMAGE,
                            tie_word_embeddings=False, **extra)

    return config


def _qwen_config(config_class, vision: dict, **text_extra):
    def config(num_layers: int):
        return config_class(text_config={**_qwen_text(num_layers), **text_extra}, vision_config=vision,
                            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
                            vision_end_token_id=VEND, tie_word_embeddings=False)

    return config


def _next_image_tokens(image: dict) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    h, w = image["size"]
    nph, npw = get_anyres_image_grid_shape((h, w), NEXT_PINPOINTS, 16)
    s = 16 // 4
    r, c = unpad_image(torch.zeros(1, nph * s, npw * s), (h, w)).shape[-2:]
    return [IMAGE] * (s * s + r * (c + 1))


def _qwen_image_tokens(image: dict) -> list[int]:
    t, h, w = image["thw"]
    return [VSTART] + [IMAGE] * (t * (h // QWEN_MERGE) * (w // QWEN_MERGE)) + [VEND]


def _qwen_pixels(images: list[dict], gen: torch.Generator) -> dict:
    thw = torch.tensor([im["thw"] for im in images])
    n_patches = int(thw.prod(-1).sum())
    return {"pixel_values": torch.randn(n_patches, 3 * QWEN_TPATCH * QWEN_PATCH * QWEN_PATCH, generator=gen),
            "image_grid_thw": thw}


def _qwen_select(inputs: dict, first: int, n: int) -> dict:
    thw = inputs["image_grid_thw"]
    rows = torch.cat([torch.zeros(1, dtype=torch.long), thw.prod(-1).cumsum(0)])
    return {"pixel_values": inputs["pixel_values"][rows[first]:rows[first + n]], "image_grid_thw": thw[first:first + n]}


def _slices(*keys: str):
    """``select`` for families whose image tensors have one leading row per image."""
    return lambda inputs, first, n: {k: inputs[k][first:first + n] for k in keys}


@dataclass(frozen=True)
class Family:
    """One tiny test family: how to build it, and how its images appear in prompts and inputs."""

    name: str
    model_class: type
    #: ``num_layers -> config`` (hidden 32, 4 heads / 2 KV heads)
    config: Callable[[int], object]
    #: default image descriptions; the k-th image of a batch takes ``images[k % len(images)]`` (so layouts differ)
    images: tuple[dict, ...]
    #: placeholder token ids of one image
    image_tokens: Callable[[dict], list[int]]
    #: the image tensors of a batch's images, in order (random pixels from ``gen``)
    pixels: Callable[[list[dict], torch.Generator], dict]
    #: the image tensors of images ``[first, first + n)`` of a batch made by ``make_inputs``
    select: Callable[[dict, int, int], dict]
    #: the inputs carry ``mm_token_type_ids`` (1 on image tokens)
    token_types: bool = False


_LLAVA_NEXT = dict(images=({"size": (20, 30)}, {"size": (30, 12)}, {"size": (32, 32)}),
                   image_tokens=_next_image_tokens,
                   pixels=lambda images, gen: {"pixel_values": torch.randn(len(images), 5, 3, 16, 16, generator=gen),
                                               "image_sizes": torch.tensor([im["size"] for im in images])},
                   select=_slices("pixel_values", "image_sizes"))
_QWEN2_VL_VISION = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=QWEN_PATCH,
                        spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TPATCH, in_channels=3)
_QWEN = dict(images=({"thw": (1, 4, 6)}, {"thw": (1, 4, 4)}, {"thw": (1, 6, 4)}), image_tokens=_qwen_image_tokens,
             pixels=_qwen_pixels, select=_qwen_select, token_types=True)

FAMILY_SPECS: dict[str, Family] = {f.name: f for f in (
    # LLaVA: 16 px images, patch 4 -> a 4 x 4 grid of 16 tokens per image.
    Family("llava", LlavaForConditionalGeneration, _llava_config(LlavaConfig), ({},),
           image_tokens=lambda image: [IMAGE] * (LLAVA_GRID * LLAVA_GRID),
           pixels=lambda images, gen: {"pixel_values": torch.randn(len(images), 3, 16, 16, generator=gen)},
           select=_slices("pixel_values")),
    # LLaVA-NeXT: base 4 x 4 grid plus the unpadded high-resolution grid (1 base + up to 4 tiles of 16 px).
    Family("llava_next", LlavaNextForConditionalGeneration,
           _llava_config(LlavaNextConfig, image_grid_pinpoints=NEXT_PINPOINTS), **_LLAVA_NEXT),
    # Qwen2-VL / Qwen2.5-VL: patch 4, merge 2; a 16 x 24 px image is grid_thw (1, 4, 6) -> 2 x 3 = 6 tokens.
    Family("qwen2_vl", Qwen2VLForConditionalGeneration, _qwen_config(Qwen2VLConfig, _QWEN2_VL_VISION), **_QWEN),
    Family("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration,
           _qwen_config(Qwen2_5_VLConfig, dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64,
                                               num_heads=2, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE,
                                               temporal_patch_size=QWEN_TPATCH, window_size=16,
                                               fullatt_block_indexes=[1], in_channels=3)), **_QWEN),
    # Sliding-window text models (variants of the families above, not in FAMILIES): a LLaVA-NeXT on a Mistral
    # decoder whose every layer attends within 8 positions (no layer_types), and a Qwen2-VL whose layers from 1 on
    # are "sliding_attention" layers of window 6 (layer_types, as Qwen2 / Gemma-style configs declare them).
    Family("llava_next_mistral", LlavaNextForConditionalGeneration,
           _llava_config(LlavaNextConfig, text=_mistral_text, image_grid_pinpoints=NEXT_PINPOINTS), **_LLAVA_NEXT),
    Family("qwen2_vl_window", Qwen2VLForConditionalGeneration,
           _qwen_config(Qwen2VLConfig, _QWEN2_VL_VISION, use_sliding_window=True, sliding_window=6,
                        max_window_layers=1), **_QWEN),
)}
#: the four supported families (every family-parametrised test runs on these)
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
#: sliding-window variants of them (the invariant table runs them on a subset of its settings)
WINDOW_FAMILIES = ("llava_next_mistral", "qwen2_vl_window")


def config_for(family: str, num_layers: int = 2):
    """The tiny config of ``family`` (``num_layers`` decoder layers, hidden 32, 4 heads / 2 KV heads)."""
    return FAMILY_SPECS[family].config(num_layers)


def model_class(family: str):
    return FAMILY_SPECS[family].model_class


def build(family: str, attn_implementation="sdpa", seed: int = 0, num_layers: int = 2):
    """A tiny random model of ``family`` in eval mode, float32, on CPU (same weights for the same ``seed``)."""
    torch.manual_seed(seed)
    model = model_class(family)._from_config(config_for(family, num_layers), attn_implementation=attn_implementation)
    # Random init of tiny models gives near-uniform attention; scale q/k up so masks visibly change the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                p.mul_(8.0)
    return model.eval()


def module_model_cache(num_layers: int, prepare: Callable | None = None):
    """A ``model_for(family, impl="hf_kan")`` that builds each tiny model once per test module (``prepare(model)``
    applied after building, e.g. ``plant_sink_dims``).

    Each call returns its own cache, so patches that one test module applies never reach another module's models.
    """
    cache: dict = {}

    def model_for(family: str, impl: str = "hf_kan"):
        if (family, impl) not in cache:
            model = build(family, impl, num_layers=num_layers)
            cache[family, impl] = prepare(model) if prepare is not None else model
        return cache[family, impl]

    return model_for


def plant_sink_dims(model, dims=(3, 17), values=(1.0, -0.7), token: int = BOS):
    """Give ``token``'s embedding "massive activations" in ``dims``, so it is a VAR sink token in every layer (hidden
    size 32 caps ``phi`` at ``sqrt(32 / 2) = 4``, so VAR tests use ``tau = 1.5``, not the paper's 20)."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for d, v in zip(dims, values):
            emb[token, d] = v
    return model


# ----------------------------------------------------------------------------------------------- inputs


def make_inputs(family: str, prompts: list[list], padding_side: str = "left", seed: int = 0) -> dict:
    """Model inputs for a batch of prompts (see the module docstring for the prompt format).

    Images get random pixels (seeded). Returns ``input_ids``, ``attention_mask``, the family's image tensors and,
    for Qwen, ``mm_token_type_ids``.
    """
    spec = FAMILY_SPECS[family]
    gen = torch.Generator().manual_seed(seed)
    seqs, images, per_sample = [], [], []
    for prompt in prompts:
        per_sample.append(sum(1 for item in prompt if item == IMG))
        ids = []
        for item in prompt:
            if item == IMG:
                image = spec.images[len(images) % len(spec.images)]
                images.append(image)
                ids += spec.image_tokens(image)
            else:
                ids.append(int(item))
        seqs.append(ids)
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(length - len(s), length) if padding_side == "left" else slice(0, len(s))
        input_ids[b, sl] = torch.tensor(s)
        attention_mask[b, sl] = 1
    out = Inputs(input_ids=input_ids, attention_mask=attention_mask)
    out.images_per_sample = per_sample
    if spec.token_types:
        out["mm_token_type_ids"] = (input_ids == IMAGE).to(torch.int)
    if images:
        out.update(spec.pixels(images, gen))
    return out


class Inputs(dict):
    """Model keyword arguments, plus ``images_per_sample`` (used by ``sample_inputs``)."""

    images_per_sample: list[int]


def sample_inputs(family: str, inputs: Inputs, b: int) -> Inputs:
    """Sample ``b`` of a batch made by ``make_inputs``, alone and without padding (same images, same pixels)."""
    ips = inputs.images_per_sample
    first, n = sum(ips[:b]), ips[b]
    valid = inputs["attention_mask"][b].bool()
    out = Inputs(input_ids=inputs["input_ids"][b][valid][None], attention_mask=torch.ones(1, int(valid.sum()),
                                                                                          dtype=torch.long))
    out.images_per_sample = [n]
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][b][valid][None]
    if n == 0 or "pixel_values" not in inputs:
        return out
    out.update(FAMILY_SPECS[family].select(inputs, first, n))
    return out


def standard_prompt(n_images: int = 1, before: int = 2, after: int = 3) -> list:
    """``BOS USER w.. <image> .. w.. ASSISTANT`` with ``before`` words before the first image and ``after`` words after
    each image (Qwen needs text between adjacent images)."""
    p = [BOS, USER] + [10 + i for i in range(before)]
    for k in range(n_images):
        p += [IMG] + [20 + 3 * k + i for i in range(after)]
    return p + [ASSISTANT]


def chat_tokenizer():
    """A word-level fast tokenizer over this module's vocabulary with a LLaVA-1.5-style chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "USER:", "ASSISTANT:", "<image>", "<video>", "<vs>", "<ve>", "<nl>"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(10, VOCAB)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
        "{% else %}ASSISTANT: {{ m['content'] }} </s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    return fast


_CACHE: dict = {}


def shared(family: str, attn_implementation: str = "sdpa"):
    """One tiny model per (family, implementation) for the whole test session (same weights as ``build(family)``).
    Tests that change its patches must set the patch state they need themselves."""
    key = (family, attn_implementation)
    if key not in _CACHE:
        _CACHE[key] = build(family, attn_implementation)
    return _CACHE[key]


SUPPRESS = [IMAGE, VIDEO, VSTART, VEND]  # never generate placeholder ids (a full forward would read them as images)


# ----------------------------------------------------------------------------------------------- conversations


def _images_in_order(family: str, turns: list[Inputs]) -> dict:
    """The image tensors of several ``make_inputs`` batches (one per turn), sample by sample and turn by turn: the
    order in which a forward over the whole conversation meets them."""
    spec = FAMILY_SPECS[family]
    offsets = [0] * len(turns)
    parts = []
    for b in range(len(turns[0].images_per_sample)):
        for i, turn in enumerate(turns):
            n = turn.images_per_sample[b]
            if n:
                parts.append(spec.select(turn, offsets[i], n))
            offsets[i] += n
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def next_turn(family: str, model, first: Inputs, answer: torch.Tensor, prompts: list[list], seed: int = 1):
    """A second user turn (``prompts``, left-padded, with new images) after ``first`` and the generated ``answer``
    (``generate(...).sequences``). Returns ``(cached, full)``: the kwargs of a ``generate`` that continues from the
    first turn's cache (whole conversation ids, the new turn's images; pass ``cache=...``), and those of a generate
    over the whole conversation from scratch (every image). Qwen gets explicit M-RoPE ``position_ids`` for the cached
    call: Transformers 5.24 cannot compute them from the new turn's grids alone."""
    turn = make_inputs(family, prompts, "left", seed=seed)
    b, answered = answer.shape
    ids = torch.cat([answer, turn["input_ids"]], 1)
    generated = torch.ones(b, answered - first["attention_mask"].shape[1], dtype=torch.long)
    mask = torch.cat([first["attention_mask"], generated, turn["attention_mask"]], 1)
    base = {"input_ids": ids, "attention_mask": mask}
    if FAMILY_SPECS[family].token_types:
        base["mm_token_type_ids"] = (ids == IMAGE).to(torch.int)
    images = {k: v for k, v in turn.items() if k not in base}
    full = {**base, **_images_in_order(family, [first, turn])}
    cached = {**base, **images}
    if FAMILY_SPECS[family].token_types:
        grids = {k: v for k, v in full.items() if k != "pixel_values"}
        cached["position_ids"] = model._prepare_position_ids_for_generation(ids, grids)
    return cached, full
