"""Attention-based visual-token pruning (FastV, PDrop) with attention debiasing, on the engine's token dropping."""

from __future__ import annotations

from ..engine.spec import CliCommand, PatchSpec
from .config import PruneConfig, resolve_prune
from .runtime import PruneRuntime

SPEC = PatchSpec(
    name="prune", config_class=PruneConfig, runtime_class=PruneRuntime, resolve=resolve_prune,
    cli=(CliCommand("calibrate-prune", "hf_kan.patches.prune.calibrate",
                    "fit the positional attention trend used to debias visual-token pruning (and store it in the "
                    "config)"),),
)

__all__ = ["SPEC", "PruneConfig", "PruneRuntime"]
