"""KArAt: ViT with learnable Fourier-KAN attention, registered with the Transformers Auto classes.

Importing this package registers ``model_type="karat"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForImageClassification``, ``HFKanViTImageProcessor`` with ``AutoImageProcessor`` (PIL only; idempotent),
and the presets ``"karat-{tiny,small,base}-{g3b,g3u,g1b}"`` (patch 16, 224 px; G = number of Fourier frequencies,
B = blockwise, U = universal operator sharing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from ..image_processing import HFKanViTImageProcessor
from ..presets import register_preset
from ..vit_config import VIT_SHAPES, vit_preset_kwargs
from .configuration_karat import KArAtConfig
from .modeling_karat import KArAtForImageClassification, KArAtModel, KArAtPreTrainedModel, karat_attention_forward

AutoConfig.register(KArAtConfig.model_type, KArAtConfig, exist_ok=True)
AutoModel.register(KArAtConfig, KArAtModel, exist_ok=True)
AutoModelForImageClassification.register(KArAtConfig, KArAtForImageClassification, exist_ok=True)
# KArAt preprocesses like ViT. Registered for PIL only, and so found by name, hf-kan's trained models (KAT, KArAt or
# ViT) save this processor: AutoImageProcessor never swaps in the torchvision backend (hf_kan.models.image_processing)
AutoImageProcessor.register(KArAtConfig, image_processor_classes={"pil": HFKanViTImageProcessor}, exist_ok=True)

# name -> (hidden_size, num_hidden_layers, num_attention_heads): the ViT-T/S/B shapes of the paper.
KARAT_SIZES: dict[str, tuple[int, int, int]] = {f"karat-{size}": shape for size, shape in VIT_SHAPES.items()}
# variant suffix -> (karat_grid_size, karat_sharing): the paper's G3B, G3U and G1B.
KARAT_VARIANTS: dict[str, tuple[int, str]] = {
    "g3b": (3, "blockwise"),
    "g3u": (3, "universal"),
    "g1b": (1, "blockwise"),
}


def _karat_factory(shape: tuple[int, int, int], variant: tuple[int, str]) -> Callable[..., KArAtConfig]:
    hidden_size, layers, heads = shape
    grid_size, sharing = variant

    def factory(**overrides: Any) -> KArAtConfig:
        kwargs = vit_preset_kwargs(hidden_size, layers, heads)
        kwargs.update(karat_grid_size=grid_size, karat_rank=12, karat_sharing=sharing)
        kwargs.update(overrides)
        return KArAtConfig(**kwargs)

    factory.__doc__ = (
        f"KArAt config D={hidden_size}, {layers} layers, {heads} heads, G={grid_size}, {sharing} sharing, r=12; "
        "keyword overrides applied."
    )
    return factory


for _size, _shape in KARAT_SIZES.items():
    for _suffix, _variant in KARAT_VARIANTS.items():
        register_preset(f"{_size}-{_suffix}", _karat_factory(_shape, _variant))

__all__ = [
    "KARAT_SIZES",
    "KARAT_VARIANTS",
    "KArAtConfig",
    "KArAtForImageClassification",
    "KArAtModel",
    "KArAtPreTrainedModel",
    "karat_attention_forward",
]
