"""Modality-mutual attention (MMA, AKI): image tokens also attend to the prompt text that follows them."""

from __future__ import annotations

from ..engine.spec import PatchSpec
from .config import MMAConfig, resolve_mma
from .runtime import MMARuntime

SPEC = PatchSpec(name="mma", config_class=MMAConfig, runtime_class=MMARuntime, resolve=resolve_mma,
                 changes_visibility=True)

__all__ = ["SPEC", "MMAConfig", "MMARuntime"]
