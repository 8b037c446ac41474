"""The embedded default data set: scikit-learn's handwritten digits as a ``datasets.DatasetDict``.

scikit-learn ships the UCI "optical recognition of handwritten digits" test set
(1,797 grey-scale 8x8 images, 10 classes, pixel values 0..16) inside the
package, so this data set needs no download. It is small enough to train a
ViT-style model to high accuracy on a laptop CPU in a minute or two, which is
what ``hf-kan demo`` and the tests use it for.

Preprocessing (``digits_to_pixel_values``), in order:

1. scale to [0, 1]: ``x / 16``;
2. upsample each 8x8 image to ``image_size`` x ``image_size`` with bilinear
   interpolation (``align_corners=False``);
3. repeat the grey channel ``num_channels`` times;
4. normalise: ``(x - 0.5) / 0.5``, so pixels lie in [-1, 1] (the same mean/std
   0.5 that the default image processor of ``hf_kan.train`` uses).

The split is fixed: stratified by class, with ``seed=0`` by default (not the training seed, so runs with
different training seeds are measured on the same images): 360 test images (20 %), then 180 validation
images (10 % of the whole set) carved from the rest, leaving 1,257 for training. Trainers select their model on
``"validation"`` and evaluate ``"test"`` once, at the end.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HFKanConfigError
from ..train.splits import split_indices

DIGITS_NUM_CLASSES = 10
DIGITS_MAX_VALUE = 16.0
DIGITS_MEAN = 0.5
DIGITS_STD = 0.5
DIGITS_LABEL_NAMES = [str(i) for i in range(DIGITS_NUM_CLASSES)]


def digits_to_pixel_values(
    images: np.ndarray | torch.Tensor, image_size: int = 32, num_channels: int = 3
) -> torch.Tensor:
    """Turn raw digits ``[N, 8, 8]`` (values 0..16) into normalised ``[N, C, image_size, image_size]`` floats.

    Computes ``((upsample(x / 16) - 0.5) / 0.5)`` with bilinear upsampling, the grey
    channel repeated ``num_channels`` times (see the module docstring).
    """
    if image_size < 1 or num_channels < 1:
        raise HFKanConfigError(
            f"image_size and num_channels must be positive, got image_size={image_size}, num_channels={num_channels}"
        )
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() != 3:
        raise HFKanConfigError(f"expected digit images of shape [N, H, W], got {tuple(x.shape)}")
    x = (x / DIGITS_MAX_VALUE).unsqueeze(1)  # [N, 1, 8, 8]
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - DIGITS_MEAN) / DIGITS_STD
    return x.expand(-1, num_channels, -1, -1).contiguous()


def _split_indices(
    labels: np.ndarray, test_fraction: float, validation_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / validation / test index split, deterministic in ``seed`` (fractions of the whole set)."""
    rest, test_idx = split_indices(len(labels), test_fraction, seed, stratify=labels)
    n_validation = round(validation_fraction * len(labels))
    train_pos, validation_pos = split_indices(len(rest), n_validation, seed, stratify=labels[rest])
    return rest[train_pos], rest[validation_pos], test_idx


def load_digits_dataset(
    image_size: int = 32,
    num_channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
    as_images: bool = False,
    validation_fraction: float = 0.1,
) -> datasets.DatasetDict:
    """Load scikit-learn's digits as a ``DatasetDict`` with ``"train"``, ``"validation"`` and ``"test"`` splits.

    By default each row has ``"pixel_values"`` (float32 ``[num_channels, image_size, image_size]``,
    preprocessed by :func:`digits_to_pixel_values`) and ``"label"`` (a ``ClassLabel`` with names
    ``"0".."9"``). With ``as_images=True`` rows instead hold the raw 8x8 digits as grey-scale PIL images
    in ``"image"`` (pixel ``round(x * 255 / 16)``), to exercise an image-processor pipeline;
    ``image_size`` and ``num_channels`` are then unused. ``test_fraction`` and ``validation_fraction`` are shares
    of all 1,797 images; the split depends only on them and ``seed`` (see the module docstring).
    """
    if not (0.0 < test_fraction < 1.0 and 0.0 < validation_fraction < 1.0 - test_fraction):
        raise HFKanConfigError(
            f"test_fraction and validation_fraction must be in (0, 1) and sum to less than 1, got {test_fraction} "
            f"and {validation_fraction}"
        )
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = raw.images.astype(np.float32)  # [1797, 8, 8], values 0..16
    labels = raw.target.astype(np.int64)
    train_idx, validation_idx, test_idx = _split_indices(labels, test_fraction, validation_fraction, seed)
    label_feature = datasets.ClassLabel(names=DIGITS_LABEL_NAMES)

    if as_images:
        features = datasets.Features({"image": datasets.Image(), "label": label_feature})
        pixels = np.rint(images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)

        def make(idx: np.ndarray) -> datasets.Dataset:
            return datasets.Dataset.from_dict({"image": list(pixels[idx]), "label": labels[idx]}, features=features)

    else:
        pixel_values = digits_to_pixel_values(images, image_size, num_channels).numpy()
        shape = (num_channels, image_size, image_size)
        features = datasets.Features(
            {"pixel_values": datasets.Array3D(shape=shape, dtype="float32"), "label": label_feature}
        )

        def make(idx: np.ndarray) -> datasets.Dataset:
            return datasets.Dataset.from_dict(
                {"pixel_values": pixel_values[idx], "label": labels[idx]}, features=features
            )

    return datasets.DatasetDict({"train": make(train_idx), "validation": make(validation_idx), "test": make(test_idx)})


__all__ = [
    "DIGITS_LABEL_NAMES",
    "DIGITS_MEAN",
    "DIGITS_NUM_CLASSES",
    "DIGITS_STD",
    "digits_to_pixel_values",
    "load_digits_dataset",
]
