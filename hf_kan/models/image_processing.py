"""The image processor hf-kan saves with the models it trains: ViT's preprocessing, pinned to the PIL backend.

``hf-kan train`` preprocesses images with Transformers' ``ViTImageProcessorPil`` (resize to ``size`` with PIL,
``x * rescale_factor``, ``(x - mean) / std``). Saved as it is, that processor records
``"image_processor_type": "ViTImageProcessorPil"``, which ``AutoImageProcessor`` (and so ``pipeline``) resolves
through ViT's backend mapping to the torchvision ``ViTImageProcessor`` whenever torchvision is installed; its tensor
resize does not reproduce PIL's pixels, so the model would see slightly different inputs than it was trained on.

:class:`HFKanViTImageProcessor` is the same processor under a name that ``import hf_kan`` registers with
``AutoImageProcessor`` for the PIL backend alone (as :class:`~hf_kan.models.kat.KATImageProcessor` is for converted KAT
checkpoints): asked for the torchvision backend, Transformers falls back to it.
"""

from __future__ import annotations

from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil


class HFKanViTImageProcessor(ViTImageProcessorPil):
    """``ViTImageProcessorPil`` (PIL resize to ``size``, rescale, normalise), registered with ``AutoImageProcessor`` for
    the PIL backend only, so a saved directory reloads with exactly the preprocessing it was saved with."""


__all__ = ["HFKanViTImageProcessor"]
