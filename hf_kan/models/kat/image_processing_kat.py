"""The image preprocessing of the published KAT models: timm's evaluation transform as a Transformers image processor.

timm evaluates KAT with ``crop_pct=0.875``, bicubic interpolation and ImageNet mean/std: the shorter side is
resized to ``floor(image_size / crop_pct)`` (256 for 224 px) with PIL, the center ``image_size`` square is cropped
(torchvision's ``CenterCrop``, offsets ``round((side - crop) / 2)``), then ``x / 255`` is normalised.

:class:`KATImageProcessor` reproduces that pixel for pixel, and ``AutoImageProcessor`` loads it from a saved
directory whatever is installed, because:

- it runs on the PIL backend only. Transformers' torchvision backend, which ``AutoImageProcessor`` prefers when
  torchvision is installed, resizes tensors with its own bicubic kernel, which does not reproduce PIL's. The saved
  ``preprocessor_config.json`` names ``"image_processor_type": "KATImageProcessor"``, which ``import hf_kan``
  registers with ``AutoImageProcessor`` for the PIL backend alone; asked for torchvision, Transformers falls back
  to it (and logs that it did).
- it crops like torchvision. Transformers' center crop floors the offset, so it starts one pixel earlier than
  timm whenever ``side - crop`` is ``3 (mod 4)`` (e.g. a 343-px side for a 224 crop).
"""

from __future__ import annotations

import math

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
)
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from ...errors import HFKanConfigError

KAT_CROP_PCT = 0.875


class KATImageProcessor(ConvNextImageProcessorPil):
    """timm's evaluation transform (PIL backend): bicubic resize of the shorter side to
    ``floor(size["shortest_edge"] / crop_pct)``, center crop to ``size["shortest_edge"]`` with torchvision's
    offsets, ``x / 255``, ImageNet mean/std.

    The defaults are those of the published KAT models at 224 px. Unlike the ConvNeXt processor it derives from
    (which keeps the preprocessing arguments and ``crop_pct`` handling), the crop rule applies at every size.
    """

    size = {"shortest_edge": 224}
    crop_pct = KAT_CROP_PCT
    resample = PILImageResampling.BICUBIC
    image_mean = list(IMAGENET_DEFAULT_MEAN)
    image_std = list(IMAGENET_DEFAULT_STD)

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: PILImageResampling | None,
        crop_pct: float = KAT_CROP_PCT,
        **kwargs,
    ) -> np.ndarray:
        """Resize the shorter side of a channels-first ``image`` to ``floor(size.shortest_edge / crop_pct)``, keeping
        the aspect ratio (the longer side is truncated, as torchvision's ``Resize`` does), then center-crop a
        ``size.shortest_edge`` square."""
        if not size.shortest_edge:
            raise HFKanConfigError(f"KATImageProcessor needs size={{'shortest_edge': N}}, got {dict(size)}")
        crop = size.shortest_edge
        scaled = math.floor(crop / crop_pct)
        height, width = get_resize_output_image_size(
            image, size=scaled, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
        image = PilBackend.resize(self, image, SizeDict(height=height, width=width), resample=resample, **kwargs)
        # torchvision's CenterCrop: offsets round half to even (Python's round), where Transformers floors them
        top, left = round((height - crop) / 2), round((width - crop) / 2)
        return image[..., top : top + crop, left : left + crop]


def kat_image_processor(image_size: int = 224, crop_pct: float = KAT_CROP_PCT) -> KATImageProcessor:
    """The KAT evaluation transform at ``image_size`` (square) px: see :class:`KATImageProcessor`."""
    if image_size < 1:
        raise HFKanConfigError(f"kat_image_processor: image_size={image_size} must be a positive integer")
    if not 0.0 < crop_pct <= 1.0:
        raise HFKanConfigError(f"kat_image_processor: crop_pct={crop_pct} must be in (0, 1]")
    return KATImageProcessor(size={"shortest_edge": image_size}, crop_pct=crop_pct)


__all__ = ["KAT_CROP_PCT", "KATImageProcessor", "kat_image_processor"]
