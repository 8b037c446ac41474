"""hf-kan: Kolmogorov-Arnold backbones, multimodal attention patches and MoH for Transformers.

Importing this package registers everything it adds to Transformers and PEFT (model types with the Auto classes,
the ``"hf_kan"`` attention implementation, the MoH PEFT method). Registration is idempotent and costs nothing
up front: each part is registered as soon as the Transformers or PEFT registry it goes into is imported
(immediately, if it already is; see :mod:`hf_kan._registration`). The public names below are imported on first
access (PEP 562), so ``import hf_kan`` itself loads neither torch, Transformers nor PEFT.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _registration, errors
from .errors import HFKanError

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY_ATTRIBUTES = {
    "FourierKArAtOperator": "hf_kan.modules.fourier_attention",
    "GroupRational": "hf_kan.modules.group_rational",
    "KArAtConfig": "hf_kan.models.karat",
    "KArAtForImageClassification": "hf_kan.models.karat",
    "KArAtModel": "hf_kan.models.karat",
    "KATConfig": "hf_kan.models.kat",
    "KATForImageClassification": "hf_kan.models.kat",
    "KATModel": "hf_kan.models.kat",
    "MoHConfig": "hf_kan.moh",
    "available_presets": "hf_kan.models.presets",
    "config_from_preset": "hf_kan.models.presets",
    "moh_aux_loss": "hf_kan.moh",
    "register_preset": "hf_kan.models.presets",
}
_SUBMODULES = ("cli", "data", "eval", "hub", "models", "modules", "moh", "ops", "patches", "train")

_registration.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES) | set(_SUBMODULES))


__all__ = [
    "FourierKArAtOperator",
    "GroupRational",
    "HFKanError",
    "KArAtConfig",
    "KArAtForImageClassification",
    "KArAtModel",
    "KATConfig",
    "KATForImageClassification",
    "KATModel",
    "MoHConfig",
    "__version__",
    "available_presets",
    "config_from_preset",
    "errors",
    "models",
    "moh",
    "moh_aux_loss",
    "register_preset",
]
