"""Named model presets (``"kat-tiny"``, ``"vit-tiny"``, ...) shared by training, benchmarks and the CLI.

A preset is a factory returning a ``PretrainedConfig``; keyword overrides
(``image_size``, ``num_labels``, ...) are passed to it. Model packages register
their own presets when imported; the plain-ViT baselines that KAT and KArAt are
compared against are registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PretrainedConfig, ViTConfig

from ..errors import HFKanConfigError

_PRESETS: dict[str, Callable[..., PretrainedConfig]] = {}


def register_preset(name: str, factory: Callable[..., PretrainedConfig]) -> None:
    """Register ``factory(**overrides) -> PretrainedConfig`` under ``name`` (re-registering replaces it)."""
    _PRESETS[name] = factory


def available_presets() -> list[str]:
    """Names of every registered preset, sorted."""
    return sorted(_PRESETS)


def config_from_preset(name: str, **overrides: Any) -> PretrainedConfig:
    """Build the config of preset ``name`` with ``overrides`` applied (e.g. ``image_size=32, num_labels=10``)."""
    if name not in _PRESETS:
        raise HFKanConfigError(
            f"unknown model preset {name!r}; available presets: {', '.join(available_presets())}. "
            "Import the package that defines it (``import hf_kan`` registers all built-in ones)."
        )
    return _PRESETS[name](**overrides)


def _vit_factory(hidden_size: int, layers: int, heads: int) -> Callable[..., PretrainedConfig]:
    def factory(**overrides: Any) -> PretrainedConfig:
        kwargs: dict[str, Any] = dict(
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden_size,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            qkv_bias=True,
            image_size=224,
            patch_size=16,
        )
        kwargs.update(overrides)
        return ViTConfig(**kwargs)

    return factory


# The GELU-MLP ViT baselines (DeiT/timm ViT-Ti/S/B shapes).
for _name, _shape in {"vit-tiny": (192, 12, 3), "vit-small": (384, 12, 6), "vit-base": (768, 12, 12)}.items():
    register_preset(_name, _vit_factory(*_shape))

__all__ = ["available_presets", "config_from_preset", "register_preset"]
