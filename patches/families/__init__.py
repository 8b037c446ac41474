"""Per-family adapters: how to read the token layout of each supported model family.

Adding a family = one small file defining ``ADAPTER = FamilyAdapter(...)`` and one line in ``ADAPTERS``.
"""

from __future__ import annotations

from torch import nn

from ...errors import UnsupportedModelError
from . import llava, llava_next, qwen2_5_vl, qwen2_vl
from .base import FamilyAdapter

ADAPTERS: dict[str, FamilyAdapter] = {
    a.model_type: a for a in (llava.ADAPTER, llava_next.ADAPTER, qwen2_vl.ADAPTER, qwen2_5_vl.ADAPTER)
}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of ``model``'s family, or ``UnsupportedModelError`` naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"hf_kan patches do not support model type {model_type!r} ({type(model).__name__}); supported: "
            f"{sorted(ADAPTERS)} (load the ...ForConditionalGeneration class of one of these)"
        )
    return adapter


__all__ = ["ADAPTERS", "FamilyAdapter", "adapter_for"]
