"""Image-classification data for the training entry points.

Turns either the embedded digits (:mod:`hf_kan.data.digits`) or any Hugging Face
``datasets`` data set with an image column and a label column into two torch
data sets yielding ``{"pixel_values": [C, H, W] float tensor, "labels": int}``.

- Rows that already carry a ``pixel_values`` array (the embedded digits, or a
  data set preprocessed offline) are used as they are and held in memory as
  one tensor (fast batching).
- Rows with images are preprocessed on the fly by an image processor: the
  one given, the one saved with a pretrained model, or a default
  ``ViTImageProcessorPil`` (bilinear resize to the model's image size,
  rescale to [0, 1], normalise with mean = std = 0.5), which is then saved
  with the trained model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers.utils import logging

from ..data import load_digits_dataset
from ..errors import HFKanConfigError, InputLayoutError

logger = logging.get_logger(__name__)

EMBEDDED_DATASET = "digits"
_EVAL_SPLIT_CANDIDATES = ("test", "validation", "valid", "val")
DEFAULT_MEAN_STD = 0.5


@dataclass
class ClassificationData:
    """The prepared splits, label names and the image processor used (``None`` for pre-computed pixel values)."""

    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    label_names: list[str]
    image_processor: Any | None


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
    """A ``ViTImageProcessorPil``: bilinear resize to ``image_size``, x / 255, (x - 0.5) / 0.5 per channel."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=2,  # PIL bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[DEFAULT_MEAN_STD] * num_channels,
        image_std=[DEFAULT_MEAN_STD] * num_channels,
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


def _select_splits(
    raw: datasets.DatasetDict, train_split: str, eval_split: str | None, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Pick the train and eval splits; without an eval split, hold out ``eval_fraction`` of train (seeded)."""
    if train_split not in raw:
        raise HFKanConfigError(f"train split {train_split!r} not found; the data set has splits {list(raw)}")
    if eval_split is not None:
        if eval_split not in raw:
            raise HFKanConfigError(f"eval split {eval_split!r} not found; the data set has splits {list(raw)}")
        return raw[train_split], raw[eval_split]
    for name in _EVAL_SPLIT_CANDIDATES:
        if name in raw and name != train_split:
            return raw[train_split], raw[name]
    if not 0.0 < eval_fraction < 1.0:
        raise HFKanConfigError(
            f"the data set has no eval split (looked for {', '.join(_EVAL_SPLIT_CANDIDATES)}) and eval_fraction="
            f"{eval_fraction} cannot hold one out; pass eval_split or an eval_fraction in (0, 1)"
        )
    logger.warning(f"no eval split found; holding out {eval_fraction:.0%} of {train_split!r} (seed {seed})")
    parts = raw[train_split].train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]


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
            raise InputLayoutError(f"label {value!r} of the eval split does not occur in the train split")
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
    eval_split: str | None = None,
    eval_fraction: float = 0.1,
    image_column: str = "image",
    label_column: str = "label",
    image_processor: Any | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> ClassificationData:
    """Prepare train/eval data for image classification at ``image_size`` with ``num_channels`` channels.

    ``dataset=None`` or ``"digits"`` selects the embedded digits. Otherwise ``dataset`` is a
    ``save_to_disk`` directory, a Hub id or anything else ``datasets.load_dataset`` accepts.
    ``max_*_samples`` keep a seeded random subset of the training split and the first rows of the eval split.
    """
    if dataset in (None, EMBEDDED_DATASET):
        raw = load_digits_dataset(image_size=image_size, num_channels=num_channels, seed=seed)
    else:
        raw = _load_raw(dataset, dataset_config)
    train, evaluation = _select_splits(raw, train_split, eval_split, eval_fraction, seed)
    if max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        evaluation = evaluation.select(range(min(max_eval_samples, len(evaluation))))
    label_names, to_id = _label_mapping(train, label_column)

    if "pixel_values" in train.column_names and image_column not in train.column_names:
        train_set, eval_set = (_as_tensor_dataset(s, label_column, to_id) for s in (train, evaluation))
        shape = tuple(train_set.pixel_values.shape[1:])
        if shape != (num_channels, image_size, image_size):
            raise InputLayoutError(
                f"the data set's pixel_values have shape {shape} but the model expects "
                f"{(num_channels, image_size, image_size)}; set image_size/num_channels to match the data"
            )
        return ClassificationData(train_set, eval_set, label_names, None)

    if image_processor is None:
        image_processor = default_image_processor(image_size, num_channels)
    train_set, eval_set = (
        _with_image_transform(s, image_column, label_column, to_id, image_processor, num_channels)
        for s in (train, evaluation)
    )
    return ClassificationData(train_set, eval_set, label_names, image_processor)


__all__ = [
    "EMBEDDED_DATASET",
    "ClassificationData",
    "TensorClassificationDataset",
    "collate_classification",
    "default_image_processor",
    "load_classification_data",
]
