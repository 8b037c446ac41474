"""Training entry points that run under ``accelerate launch`` (one or several processes) or plain Python."""

from __future__ import annotations

from .data import ClassificationData, default_image_processor, load_classification_data
from .image_classification import ImageClassificationArguments, evaluate, train_image_classification

__all__ = [
    "ClassificationData",
    "ImageClassificationArguments",
    "default_image_processor",
    "evaluate",
    "load_classification_data",
    "train_image_classification",
]
