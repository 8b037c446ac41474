"""KAT: ViT with Group-Rational KAN MLPs, registered with the Transformers Auto classes.

Importing this package registers ``model_type="kat"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForImageClassification`` and ``AutoBackbone``, ``KATImageProcessor`` with ``AutoImageProcessor`` (PIL
backend only: see :mod:`.image_processing_kat`) (all idempotent), and the size presets ``"kat-tiny"``,
``"kat-small"`` and ``"kat-base"`` (patch 16, 224 px, as published).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from ..presets import register_preset
from ..vit_config import VIT_SHAPES, vit_preset_kwargs
from .configuration_kat import KATConfig
from .image_processing_kat import KATImageProcessor, kat_image_processor
from .modeling_kat import KATBackbone, KATForImageClassification, KATModel, KATPreTrainedModel

AutoConfig.register(KATConfig.model_type, KATConfig, exist_ok=True)
AutoModel.register(KATConfig, KATModel, exist_ok=True)
AutoModelForImageClassification.register(KATConfig, KATForImageClassification, exist_ok=True)
AutoBackbone.register(KATConfig, KATBackbone, exist_ok=True)
# PIL only: the published preprocessing is PIL's bicubic resize, which the torchvision backend does not reproduce
AutoImageProcessor.register(KATConfig, image_processor_classes={"pil": KATImageProcessor}, exist_ok=True)

# name -> (hidden_size, num_hidden_layers, num_attention_heads), the published KAT-T/S/B shapes.
KAT_SIZES: dict[str, tuple[int, int, int]] = {f"kat-{size}": shape for size, shape in VIT_SHAPES.items()}


def _kat_factory(hidden_size: int, layers: int, heads: int) -> Callable[..., KATConfig]:
    def factory(**overrides: Any) -> KATConfig:
        kwargs = vit_preset_kwargs(hidden_size, layers, heads)
        kwargs.update(rational_groups=8, rational_1_init="identity", rational_2_init="swish")
        kwargs.update(overrides)
        return KATConfig(**kwargs)

    factory.__doc__ = f"KAT config D={hidden_size}, {layers} layers, {heads} heads; keyword overrides applied."
    return factory


for _name, _shape in KAT_SIZES.items():
    register_preset(_name, _kat_factory(*_shape))

__all__ = [
    "KAT_SIZES",
    "KATBackbone",
    "KATConfig",
    "KATForImageClassification",
    "KATImageProcessor",
    "KATModel",
    "KATPreTrainedModel",
    "kat_image_processor",
]
