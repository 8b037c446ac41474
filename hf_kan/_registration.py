"""What ``import hf_kan`` registers with Transformers and PEFT, each part as soon as its registry is imported.

- ``model_type`` ``"kat"`` / ``"karat"`` with ``AutoConfig``, ``AutoModel``, ``AutoModelForImageClassification`` and
  ``AutoBackbone``: when ``transformers.models.auto.configuration_auto`` or ``...modeling_auto`` is imported, by
  importing :mod:`hf_kan.models` (whose family packages register themselves).
- The ``"hf_kan"`` attention implementation: when ``transformers.modeling_utils`` (``AttentionInterface``) and
  ``transformers.masking_utils`` (``AttentionMaskInterface``) are imported, as thin functions that import the
  patches' backend on their first call (:data:`PATCHES_BACKEND`, the one place that names it). Importing
  ``hf_kan.patches`` registers the backend's own functions over them.
- The MoH PEFT method (``PeftType.MOH``): when ``peft`` is imported, through ``hf_kan.moh.register_moh``.

Each registration is idempotent; :mod:`hf_kan._import_hooks` decides when it runs (never while one of the modules
it depends on is still being imported).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from ._import_hooks import when_imported

ATTENTION_IMPLEMENTATION = "hf_kan"
PATCHES_BACKEND = "hf_kan.patches.engine.backend"  # defines hf_kan_attention and hf_kan_mask

_backend_module: Any = None


def _backend() -> Any:
    global _backend_module
    if _backend_module is None:
        _backend_module = importlib.import_module(PATCHES_BACKEND)
    return _backend_module


def hf_kan_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"hf_kan"`` attention function until ``hf_kan.patches`` is imported: loads it and delegates."""
    return _backend().hf_kan_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def hf_kan_mask(*args, **kwargs):
    """The ``"hf_kan"`` mask builder until ``hf_kan.patches`` is imported: loads it and delegates."""
    return _backend().hf_kan_mask(*args, **kwargs)


def _register_attention() -> None:
    if PATCHES_BACKEND not in sys.modules:  # once imported, the backend has registered its own functions
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(ATTENTION_IMPLEMENTATION, hf_kan_attention)


def _register_mask() -> None:
    if PATCHES_BACKEND not in sys.modules:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, hf_kan_mask)


def _register_models() -> None:
    importlib.import_module("hf_kan.models")


def _register_moh() -> None:
    importlib.import_module("hf_kan.moh").register_moh()


def install() -> None:
    """Arrange every registration above (called once by ``hf_kan/__init__.py``)."""
    # Registration imports hf-kan's modeling code, which needs Transformers' modules complete: it waits until no
    # Transformers (or PEFT, which imports Transformers) import is in progress.
    when_imported(
        ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto"),
        _register_models,
        wait_for=("transformers.", "peft."),
    )
    when_imported("transformers.modeling_utils", _register_attention, wait_for=("transformers.",))
    when_imported("transformers.masking_utils", _register_mask, wait_for=("transformers.",))
    # registration imports hf_kan.moh's modules: never while one of them (or PEFT itself) is being imported
    when_imported("peft", _register_moh, wait_for=("peft.", "transformers.", "hf_kan.moh."))


__all__ = ["ATTENTION_IMPLEMENTATION", "PATCHES_BACKEND", "hf_kan_attention", "hf_kan_mask", "install"]
