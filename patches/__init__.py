"""Attention patches for multimodal LLMs, shipped as ``hf_kan.patches``.

Importing registers the ``"hf_kan"`` attention implementation (attention function + mask builder) and the built-in
patches (MMA, VAR, FastV/PDrop pruning, DyVTE). Use it with ``attn_implementation="hf_kan"`` (or
``{"text_config": "hf_kan", "vision_config": "sdpa"}``) and turn patches on with :func:`apply`; :func:`status`
reports what is active. This namespace holds the user calls and config classes; patch authors find the engine in
``hf_kan.patches.engine`` and the patch table in ``hf_kan.patches.registry``. See ``patches/DESIGN.md``.
"""

from __future__ import annotations

from . import registry  # noqa: F401  (registers the built-in patches; first: everything below reads the table)
from .api import apply, detach, from_pretrained, status
from .dyvte import DyVTEConfig
from .dyvte.release import load_released_routers
from .dyvte.runtime import exit_layers, mask_visual_after
from .engine import backend
from .engine.cache import HFKanCache
from .engine.config import PatchConfig
from .engine.efficiency import EfficiencyReport, efficiency_report
from .mma import MMAConfig
from .prune import PruneConfig
from .prune.calibrate import calibrate_trend
from .prune.picture import kept_token_grid, plot_kept_tokens
from .prune.runtime import padding_cache
from .var import VARConfig
from .var.calibrate import find_sink_dims, sink_dim_scores
from .var.picture import plot_var, record_var

backend.register()

__all__ = [
    "DyVTEConfig",
    "EfficiencyReport",
    "HFKanCache",
    "MMAConfig",
    "PatchConfig",
    "PruneConfig",
    "VARConfig",
    "apply",
    "calibrate_trend",
    "detach",
    "efficiency_report",
    "exit_layers",
    "find_sink_dims",
    "from_pretrained",
    "kept_token_grid",
    "load_released_routers",
    "mask_visual_after",
    "padding_cache",
    "plot_kept_tokens",
    "plot_var",
    "record_var",
    "sink_dim_scores",
    "status",
]
