"""Training entry points that run under ``accelerate launch`` (one or several processes) or plain Python.

The names below are imported on first access (PEP 562), so ``python -m hf_kan.train.image_classification`` and
``hf-kan train --help`` load only what they use.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY_ATTRIBUTES = {
    "ClassificationData": ".data",
    "ImageClassificationArguments": ".image_classification",
    "ModelSelector": ".selection",
    "Splits": ".splits",
    "carve_validation": ".splits",
    "default_image_processor": ".data",
    "evaluate": ".image_classification",
    "load_classification_data": ".data",
    "resolve_splits": ".splits",
    "train_image_classification": ".image_classification",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES)


__all__ = sorted(_LAZY_ATTRIBUTES)
