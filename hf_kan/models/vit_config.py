"""Configuration pieces shared by hf-kan's ViT-like families (KAT, KArAt).

The published ViT-Tiny/Small/Base shapes their presets use, the keyword arguments every such preset shares, and the
validation steps common to their configs. Each check raises the error ``bad(message)`` builds, so messages keep
the family's config name; families call them in their own order between their own checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from transformers import PreTrainedConfig

from ..errors import HFKanConfigError

# size name -> (hidden_size, num_hidden_layers, num_attention_heads): ViT-T/S/B (DeiT shapes), patch 16 at 224 px.
VIT_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}

# integer fields of a ViT config that must be >= 1
VIT_SIZE_FIELDS: tuple[str, ...] = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
    "num_channels",
)
# probabilities of a ViT config that must lie in [0, 1)
VIT_RATE_FIELDS: tuple[str, ...] = ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")

ErrorFactory = Callable[[str], HFKanConfigError]


def vit_preset_kwargs(hidden_size: int, layers: int, heads: int) -> dict[str, Any]:
    """Config keywords of a ViT-shaped preset: the given shape, MLP ratio 4, 224 px images, patch 16."""
    return dict(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=4.0,
        image_size=224,
        patch_size=16,
    )


def check_positive(config: PreTrainedConfig, names: Iterable[str], bad: ErrorFactory) -> None:
    """Raise ``bad(...)`` for the first of ``names`` whose value is below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise bad(f"{name} must be a positive integer, got {getattr(config, name)}")


def check_heads_divide_hidden(config: PreTrainedConfig, bad: ErrorFactory) -> None:
    """Raise ``bad(...)`` unless ``num_attention_heads`` divides ``hidden_size``."""
    if config.hidden_size % config.num_attention_heads:
        raise bad(
            f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
        )


def check_patch_divides_image(config: PreTrainedConfig, bad: ErrorFactory) -> None:
    """Raise ``bad(...)`` unless ``image_size`` is a multiple of ``patch_size``."""
    if config.image_size % config.patch_size:
        raise bad(f"image_size={config.image_size} is not a multiple of patch_size={config.patch_size}")


def check_rates(config: PreTrainedConfig, bad: ErrorFactory, names: Iterable[str] = VIT_RATE_FIELDS) -> None:
    """Raise ``bad(...)`` for the first of ``names`` (dropout / drop-path probabilities) outside ``[0, 1)``."""
    for name in names:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise bad(f"{name} must be in [0, 1), got {getattr(config, name)}")


__all__ = [
    "VIT_RATE_FIELDS",
    "VIT_SHAPES",
    "VIT_SIZE_FIELDS",
    "check_heads_divide_hidden",
    "check_patch_divides_image",
    "check_positive",
    "check_rates",
    "vit_preset_kwargs",
]
