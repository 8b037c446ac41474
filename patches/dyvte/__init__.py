"""Dynamic visual-token exit (DyVTE): per-layer routers decide when every visual token leaves the model."""

from __future__ import annotations

from ..engine.spec import CliCommand, PatchSpec
from .config import DyVTEConfig, resolve_dyvte
from .routers import attach_routers
from .runtime import DyVTERuntime

SPEC = PatchSpec(
    name="dyvte", config_class=DyVTEConfig, runtime_class=DyVTERuntime, resolve=resolve_dyvte, attach=attach_routers,
    cli=(CliCommand("dyvte-train", "hf_kan.patches.dyvte.train", "train DyVTE exit routers on a frozen VLM"),),
)

__all__ = ["SPEC", "DyVTEConfig", "DyVTERuntime"]
