"""Configs of the Shapes VQA vision-language model: a ``LlavaForConditionalGeneration`` whose vision tower is the
registered KAT backbone (``model_type="kat"``, built through ``AutoModel``), or a same-size CLIP ViT twin.

The two towers have the same width, depth, heads and MLP width; KAT's MLP is ``rational_1 -> fc1 -> rational_2 ->
fc2`` (Group-Rational KAN), CLIP's is ``fc1 -> GELU -> fc2``, so the towers differ by the rational coefficients and
CLIP's extra pre-encoder LayerNorm (a few hundred parameters). LLaVA reads the tower's last hidden state
(``vision_feature_layer=-1``, the output of the last block before the tower's final LayerNorm, as for CLIP) without
the class token (``vision_feature_select_strategy="default"``), projects it with a two-layer GELU MLP and puts one
token per patch in place of the ``<image>`` placeholders. The text model is a small Llama.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import HFKanConfigError

TOWERS: tuple[str, ...] = ("kat", "vit")


@dataclass(frozen=True)
class VLMShape:
    """Sizes of the model (the defaults are `hf-kan vlm-train`'s; the shipped Shapes VQA model uses patch 16)."""

    image_size: int = 48
    patch_size: int = 8
    vision_hidden_size: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp_ratio: int = 2
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 8
    text_kv_heads: int = 4
    text_mlp_ratio: int = 3

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise HFKanConfigError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        for prefix in ("vision", "text"):
            hidden, heads = getattr(self, f"{prefix}_hidden_size"), getattr(self, f"{prefix}_heads")
            if hidden % heads:
                raise HFKanConfigError(f"{prefix}_heads={heads} must divide {prefix}_hidden_size={hidden}")
        if self.text_heads % self.text_kv_heads:
            raise HFKanConfigError(f"text_kv_heads={self.text_kv_heads} must divide text_heads={self.text_heads}")

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image in the language model (the patches; the class token is dropped)."""
        return (self.image_size // self.patch_size) ** 2


def vision_config(tower: str, shape: VLMShape) -> Any:
    """The vision-tower config: ``KATConfig`` for ``"kat"``, ``CLIPVisionConfig`` (GELU MLP) for ``"vit"``."""
    common = dict(
        hidden_size=shape.vision_hidden_size,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        intermediate_size=shape.vision_hidden_size * shape.vision_mlp_ratio,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        num_channels=3,
    )
    if tower == "kat":
        from ..models.kat import KATConfig

        return KATConfig(**common, rational_groups=8, rational_1_init="identity", rational_2_init="swish")
    if tower == "vit":
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**common, hidden_act="gelu", projection_dim=shape.vision_hidden_size)
    raise HFKanConfigError(f"unknown vision tower {tower!r}; choose one of {', '.join(TOWERS)}")


def vlm_config(tower: str, shape: VLMShape, tokenizer: Any) -> Any:
    """The ``LlavaConfig`` of the model with the given tower and sizes; token ids come from ``tokenizer``."""
    from transformers import LlamaConfig, LlavaConfig

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.text_hidden_size,
        intermediate_size=shape.text_hidden_size * shape.text_mlp_ratio,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config(tower, shape),
        text_config=text_config,
        image_token_id=tokenizer.image_token_id,
        image_seq_length=shape.num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_vlm(tower: str, shape: VLMShape, tokenizer: Any, attn_implementation: str | dict | None = None) -> Any:
    """A randomly initialised ``LlavaForConditionalGeneration`` (see :func:`vlm_config`)."""
    from transformers import LlavaForConditionalGeneration

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return LlavaForConditionalGeneration._from_config(vlm_config(tower, shape, tokenizer), **kwargs)


def use_rational_backend(model: Any, backend: str) -> int:
    """Set the backend of every ``GroupRational`` in ``model`` (the KAT tower's activations) to ``backend``
    (``"reference"``, ``"cpu"``, ``"triton"``, ``"auto"``); returns how many were set. Evaluation on CPU uses
    ``"reference"``: the eager path, which the ``"cpu"`` backend also takes below its compile threshold, without the
    tens of seconds of compiling its kernels for larger batches."""
    from ..modules.group_rational import GroupRational

    modules = [m for m in model.modules() if isinstance(m, GroupRational)]
    for module in modules:
        module.backend = backend
    return len(modules)


__all__ = ["TOWERS", "VLMShape", "build_vlm", "use_rational_backend", "vision_config", "vlm_config"]
