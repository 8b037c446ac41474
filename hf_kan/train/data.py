"""Image-classification data for the training entry points.

Turns either the embedded digits (:mod:`hf_kan.data.digits`) or any Hugging Face ``datasets`` data set with an
image column and a label column into train / validation / test torch data sets yielding
``{"pixel_values": [C, H, W] float tensor, "labels": int}``. The splits follow :mod:`hf_kan.train.splits`: a data
set without a validation split gets one carved from train; the test split (if any) is only for the final report.

- Rows that already carry a ``pixel_values`` array (the embedded digits, or a data set preprocessed offline) are
  used as they are and held in memory as one tensor (fast batching).
- Rows with images are preprocessed on the fly by an image processor: the one given, the one saved with a
  pretrained model, or a default ``HFKanViTImageProcessor`` (Transformers' ``ViTImageProcessorPil`` registered for
  the PIL backend only: bilinear resize to the model's image size, rescale to [0, 1], normalise with
  mean = std = 0.5), which reloads with the same PIL pixels whether or not torchvision is installed.

The image processor is saved with the trained model, so its directory works with ``AutoImageProcessor`` and
``pipeline("image-classification")``. For the embedded digits that is the default processor, which turns a digit
image (8-bit grey, pixel = round(16ths x 255 / 16)) into the training pixel values up to 8-bit rounding; for
another data set of pre-computed ``pixel_values`` it is only known if given (``image_processor``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from ..data import load_digits_dataset
from ..errors import HFKanConfigError, InputLayoutError
from .splits import DEFAULT_SPLIT_SEED, DEFAULT_VALIDATION_FRACTION, resolve_splits

EMBEDDED_DATASET = "digits"
DEFAULT_MEAN_STD = 0.5


@dataclass
class ClassificationData:
    """The prepared splits, label names and the image processor to save with the model (``None``: unknown)."""

    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset
    test: torch.utils.data.Dataset | None
    label_names: list[str]
    image_processor: Any | None
    validation_source: str = "split 'validation'"
    test_source: str | None = "split 'test'"


class TensorClassificationDataset(torch.utils.data.Dataset):
    """In-memory ``(pixel_values [N, C, H, W], labels [N])`` pairs, yielding training dicts."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        self.pixel_values = pixel_values
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def collate_classification(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch ``{"pixel_values": [B, C, H, W], "labels": [B]}``."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]),
        "labels": torch.as_tensor([int(r["labels"]) for r in rows], dtype=torch.long),
    }


def default_image_processor(image_size: int, num_channels: int) -> Any:
    """A :class:`~hf_kan.models.image_processing.HFKanViTImageProcessor` (``ViTImageProcessorPil``, registered for
    the PIL backend only): PIL bilinear resize to ``image_size``, x / 255, (x - 0.5) / 0.5 per channel (grey images
    converted to RGB first when ``num_channels`` is 3). Saved with the model, it reloads through
    ``AutoImageProcessor`` / ``pipeline`` as the same PIL processor even where torchvision is installed."""
    from ..models.image_processing import HFKanViTImageProcessor

    return HFKanViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=2,  # PIL bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[DEFAULT_MEAN_STD] * num_channels,
        image_std=[DEFAULT_MEAN_STD] * num_channels,
        do_convert_rgb=num_channels == 3,
    )


def _load_raw(dataset: str, dataset_config: str | None) -> datasets.DatasetDict:
    """Load ``dataset``: a ``save_to_disk`` directory, or anything ``datasets.load_dataset`` accepts."""
    if os.path.isdir(dataset) and (
        os.path.exists(os.path.join(dataset, "dataset_dict.json"))
        or os.path.exists(os.path.join(dataset, "state.json"))
    ):
        loaded = datasets.load_from_disk(dataset)
    else:
        loaded = datasets.load_dataset(dataset, dataset_config)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _label_mapping(train: datasets.Dataset, label_column: str) -> tuple[list[str], Callable[[Any], int] | None]:
    """Label names and a value -> id function (``None`` when labels already are ``ClassLabel`` ids)."""
    if label_column not in train.column_names:
        raise InputLayoutError(
            f"label column {label_column!r} not found; the data set has columns {train.column_names}. "
            "Pass label_column (CLI: --label-column)."
        )
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None
    values = sorted(set(train[label_column]))
    ids = {v: i for i, v in enumerate(values)}

    def to_id(value: Any) -> int:
        if value not in ids:
            raise InputLayoutError(f"label {value!r} of a validation/test row does not occur in the train split")
        return ids[value]

    return [str(v) for v in values], to_id


def _as_tensor_dataset(
    split: datasets.Dataset, label_column: str, to_id: Callable[[Any], int] | None
) -> TensorClassificationDataset:
    """Materialise a split with a ``pixel_values`` column into memory."""
    columns = split.with_format("torch", columns=["pixel_values"])[:]
    labels = split[label_column]
    labels = [to_id(v) for v in labels] if to_id is not None else list(labels)
    return TensorClassificationDataset(columns["pixel_values"].float(), torch.tensor(labels, dtype=torch.long))


def _with_image_transform(
    split: datasets.Dataset,
    image_column: str,
    label_column: str,
    to_id: Callable[[Any], int] | None,
    image_processor: Any,
    num_channels: int,
) -> datasets.Dataset:
    """Attach an on-the-fly transform: PIL images -> ``image_processor`` pixel values, labels -> ids."""
    if image_column not in split.column_names:
        raise InputLayoutError(
            f"image column {image_column!r} not found; the data set has columns {split.column_names}. "
            "Pass image_column (CLI: --image-column), or provide a 'pixel_values' column."
        )
    mode = "RGB" if num_channels == 3 else "L" if num_channels == 1 else None
    if mode is None:
        raise HFKanConfigError(f"images can be fed to models with 1 or 3 channels, the model has {num_channels}")

    def transform(batch: dict[str, list[Any]]) -> dict[str, Any]:
        images = [image.convert(mode) for image in batch[image_column]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        labels = batch[label_column] if to_id is None else [to_id(v) for v in batch[label_column]]
        return {"pixel_values": list(pixel_values), "labels": labels}

    return split.with_transform(transform)


def load_classification_data(
    dataset: str | None,
    *,
    image_size: int,
    num_channels: int,
    dataset_config: str | None = None,
    train_split: str = "train",
    validation_split: str | None = None,
    test_split: str | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    image_column: str = "image",
    label_column: str = "label",
    image_processor: Any | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> ClassificationData:
    """Prepare train / validation / test data for image classification at ``image_size`` with ``num_channels``.

    ``dataset=None`` or ``"digits"`` selects the embedded digits (fixed split, seed ``split_seed``). Otherwise
    ``dataset`` is a ``save_to_disk`` directory, a Hub id or anything else ``datasets.load_dataset`` accepts; its
    splits are resolved by :func:`hf_kan.train.splits.resolve_splits` (``validation_fraction`` of train is held
    out, seeded by ``split_seed`` and stratified by label, when it has no validation split).
    ``max_train_samples`` keeps a random subset of the training split (seeded by ``seed``), ``max_eval_samples``
    the first rows of the validation and test splits.
    """
    embedded = dataset in (None, EMBEDDED_DATASET)
    if embedded:
        raw = load_digits_dataset(image_size=image_size, num_channels=num_channels, seed=split_seed)
    else:
        raw = _load_raw(dataset, dataset_config)
    if train_split not in raw:
        raise HFKanConfigError(f"train split {train_split!r} not found; the data set has splits {list(raw)}")
    stratify = label_column if isinstance(raw[train_split].features.get(label_column), datasets.ClassLabel) else None
    splits = resolve_splits(
        raw,
        train_split=train_split,
        validation_split=validation_split,
        test_split=test_split,
        validation_fraction=validation_fraction,
        seed=split_seed,
        stratify=stratify,
    )
    train, validation, test = splits.train, splits.validation, splits.test
    if max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        validation = validation.select(range(min(max_eval_samples, len(validation))))
        test = test.select(range(min(max_eval_samples, len(test)))) if test is not None else None
    label_names, to_id = _label_mapping(train, label_column)
    parts = [train, validation] + ([test] if test is not None else [])

    if "pixel_values" in train.column_names and image_column not in train.column_names:
        prepared = [_as_tensor_dataset(s, label_column, to_id) for s in parts]
        shape = tuple(prepared[0].pixel_values.shape[1:])
        if shape != (num_channels, image_size, image_size):
            raise InputLayoutError(
                f"the data set's pixel_values have shape {shape} but the model expects "
                f"{(num_channels, image_size, image_size)}; set image_size/num_channels to match the data"
            )
        if image_processor is None and embedded:
            image_processor = default_image_processor(image_size, num_channels)
    else:
        if image_processor is None:
            image_processor = default_image_processor(image_size, num_channels)
        prepared = [
            _with_image_transform(s, image_column, label_column, to_id, image_processor, num_channels) for s in parts
        ]
    return ClassificationData(
        train=prepared[0],
        validation=prepared[1],
        test=prepared[2] if test is not None else None,
        label_names=label_names,
        image_processor=image_processor,
        validation_source=splits.validation_source,
        test_source=splits.test_source,
    )


__all__ = [
    "EMBEDDED_DATASET",
    "ClassificationData",
    "TensorClassificationDataset",
    "collate_classification",
    "default_image_processor",
    "load_classification_data",
]
