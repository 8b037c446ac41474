"""Data sets hf-kan ships or builds without downloads (the embedded default for training and the demo)."""

from __future__ import annotations

from .digits import (
    DIGITS_LABEL_NAMES,
    DIGITS_MEAN,
    DIGITS_NUM_CLASSES,
    DIGITS_STD,
    digits_to_pixel_values,
    load_digits_dataset,
)
from .shapes_vqa import generate_shapes_vqa, load_shapes_vqa, split_by_question_type

__all__ = [
    "DIGITS_LABEL_NAMES",
    "DIGITS_MEAN",
    "DIGITS_NUM_CLASSES",
    "DIGITS_STD",
    "digits_to_pixel_values",
    "generate_shapes_vqa",
    "load_digits_dataset",
    "load_shapes_vqa",
    "split_by_question_type",
]
