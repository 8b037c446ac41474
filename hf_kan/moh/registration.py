"""Registration of the MoH tuner with PEFT's mappings (``PeftType.MOH`` itself comes from ``peft_type``)."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MoHConfig
from .model import MoHModel
from .peft_type import MOH_NAME, MOH_PREFIX, moh_peft_type


def register_moh() -> None:
    """Register ``MoHConfig`` / ``MoHModel`` with PEFT (idempotent)."""
    peft_type = moh_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is MoHModel:
        return
    register_peft_method(name=MOH_NAME, config_cls=MoHConfig, model_cls=MoHModel, prefix=MOH_PREFIX)


__all__ = ["register_moh"]
