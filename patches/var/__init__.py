"""Visual attention redistribution (VAR, "See What You Are Told", ICLR 2025): attention that text queries pay to sink
tokens is partly moved onto the image in image-centric heads."""

from __future__ import annotations

from ..engine.spec import CliCommand, PatchSpec
from .config import VARConfig, resolve_var
from .runtime import VARRuntime

SPEC = PatchSpec(
    name="var", config_class=VARConfig, runtime_class=VARRuntime, resolve=resolve_var,
    cli=(CliCommand("calibrate-var", "hf_kan.patches.var.cli",
                    "find VAR's sink dimensions of a saved multimodal model (and store them in its config)"),),
)

__all__ = ["SPEC", "VARConfig", "VARRuntime"]
