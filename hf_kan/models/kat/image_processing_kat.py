"""The image preprocessing of the published KAT models, as a stock Transformers image processor.

timm evaluates KAT with ``crop_pct=0.875``, bicubic interpolation and ImageNet mean/std: the shorter side is
resized to ``floor(image_size / 0.875)`` (256 for 224 px), then the center ``image_size`` square is cropped.
Transformers' ConvNeXt image processor implements exactly this rule (for ``image_size < 384``), so hf-kan
reuses it instead of defining a new class: the saved ``preprocessor_config.json`` loads with
``AutoImageProcessor`` on any Transformers install. The PIL variant is used because it needs no torchvision.
"""

from __future__ import annotations

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from ...errors import HFKanConfigError

KAT_CROP_PCT = 0.875


def kat_image_processor(image_size: int = 224, crop_pct: float = KAT_CROP_PCT) -> ConvNextImageProcessorPil:
    """Image processor reproducing the KAT evaluation transform at ``image_size`` (square) px.

    Resize the shorter side to ``int(image_size / crop_pct)`` (bicubic), center-crop ``image_size``, rescale to
    [0, 1] and normalise with the ImageNet mean/std. ``image_size`` must be below 384, where the ConvNeXt
    processor switches to a plain resize without crop.
    """
    if not 0 < image_size < 384:
        raise HFKanConfigError(
            f"kat_image_processor: image_size={image_size} must be in (0, 384); above that the crop_pct rule of the "
            "underlying ConvNeXt processor does not apply. Build a ViTImageProcessor for large inputs instead."
        )
    if not 0.0 < crop_pct <= 1.0:
        raise HFKanConfigError(f"kat_image_processor: crop_pct={crop_pct} must be in (0, 1]")
    return ConvNextImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        crop_pct=crop_pct,
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


__all__ = ["KAT_CROP_PCT", "kat_image_processor"]
