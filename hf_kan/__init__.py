"""hf-kan: Kolmogorov-Arnold backbones, multimodal attention patches and MoH for Transformers.

Importing this package registers everything it adds to Transformers and PEFT
(model types with the Auto classes, the ``"hf_kan"`` attention implementation,
the MoH PEFT method). Registration is idempotent.
"""

from __future__ import annotations

# Importing these registers the model types, the MoH PEFT method and the "hf_kan" attention implementation.
from . import errors, models, moh, patches  # noqa: F401
from .errors import HFKanError
from .models.karat import KArAtConfig, KArAtForImageClassification, KArAtModel
from .models.kat import KATConfig, KATForImageClassification, KATModel
from .models.presets import available_presets, config_from_preset, register_preset
from .modules.fourier_attention import FourierKArAtOperator
from .modules.group_rational import GroupRational
from .moh import MoHConfig, moh_aux_loss

__version__ = "0.1.0"

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
