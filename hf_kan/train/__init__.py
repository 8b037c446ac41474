"""Training entry points that run under ``accelerate launch`` (one or several processes) or plain Python.

The names below are imported on first access (PEP 562), so ``python -m hf_kan.train.image_classification`` and
``hf-kan train --help`` load only what they use.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name not in _LAZY_ATTRIBUTES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))


__all__ = sorted(_LAZY_ATTRIBUTES)
