"""Mixture-of-Head attention (MoH, arXiv 2410.11842) as a PEFT method.

``import hf_kan`` registers ``PeftType.MOH`` with PEFT as soon as PEFT is imported, so ``get_peft_model(model,
MoHConfig(...))``, ``save_pretrained`` and ``PeftModel.from_pretrained`` work with PEFT's own calls. The names below
are imported on first access (PEP 562): ``hf_kan.moh.train`` (the ``accelerate launch`` entry point) loads without
PEFT. Module dependencies are one way: ``peft_type`` <- ``config`` <- ``router`` / ``layer`` / ``skip`` <-
``model`` <- ``registration``.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY_ATTRIBUTES = {
    "TRANSFORMERS_MODELS_TO_MOH_TARGET_MODULES_MAPPING": ".model",
    "LearnedHeadRouter": ".router",
    "MoHConfig": ".config",
    "MoHLayer": ".layer",
    "MoHLinear": ".layer",
    "MoHModel": ".model",
    "QueryNormHeadRouter": ".router",
    "load_balance_loss": ".router",
    "moh_aux_loss": ".model",
    "register_moh": ".registration",
    "skipped_head_attention": ".skip",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES)


__all__ = sorted(_LAZY_ATTRIBUTES)
