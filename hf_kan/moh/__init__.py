"""Mixture-of-Head attention (MoH, arXiv 2410.11842) as a PEFT method.

Importing this package (``import hf_kan`` does) registers ``PeftType.MOH`` with PEFT, so ``get_peft_model(model,
MoHConfig(...))``, ``save_pretrained`` and ``PeftModel.from_pretrained`` work with PEFT's own calls. Module
dependencies are one way: ``peft_type`` <- ``config`` <- ``router`` / ``layer`` / ``skip`` <- ``model`` <-
``registration``.
"""

from __future__ import annotations

from .config import MoHConfig
from .layer import MoHLayer, MoHLinear
from .model import TRANSFORMERS_MODELS_TO_MOH_TARGET_MODULES_MAPPING, MoHModel, moh_aux_loss
from .registration import register_moh
from .router import LearnedHeadRouter, QueryNormHeadRouter, load_balance_loss
from .skip import skipped_head_attention

register_moh()

__all__ = [
    "TRANSFORMERS_MODELS_TO_MOH_TARGET_MODULES_MAPPING",
    "LearnedHeadRouter",
    "MoHConfig",
    "MoHLayer",
    "MoHLinear",
    "MoHModel",
    "QueryNormHeadRouter",
    "load_balance_loss",
    "moh_aux_loss",
    "register_moh",
    "skipped_head_attention",
]
