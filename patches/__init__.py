"""Attention patches for multimodal LLMs, shipped as ``hf_kan.patches``.

Importing registers the ``"hf_kan"`` attention implementation (attention function + mask builder). Use it with
``attn_implementation="hf_kan"`` (or ``{"text_config": "hf_kan", "vision_config": "sdpa"}``) and turn patches on
with :func:`apply`; :func:`status` reports what is active. See ``patches/DESIGN.md`` for the data flow.
"""

from __future__ import annotations

from . import backend
from .api import apply, detach, from_pretrained, status
from .cache import HFKanCache, KVLedger
from .config import MMAConfig, PatchConfig
from .dropping import drop_tokens, drop_visual
from .dyvte import exit_layers, mask_visual_after
from .dyvte_config import DyVTEConfig
from .efficiency import EfficiencyReport, efficiency_report
from .families import ADAPTERS, adapter_for
from .layout import IMAGE, PAD, TEXT, VIDEO, TokenLayout
from .pruning import calibrate_trend, padding_cache
from .pruning_config import PruneConfig
from .runtime import PatchRuntime
from .state import ForwardState
from .var_calibrate import find_sink_dims, sink_dim_scores
from .var_config import VARConfig
from .visualize_pruning import kept_token_grid, plot_kept_tokens

backend.register()

__all__ = [
    "ADAPTERS",
    "IMAGE",
    "PAD",
    "TEXT",
    "VIDEO",
    "DyVTEConfig",
    "EfficiencyReport",
    "ForwardState",
    "HFKanCache",
    "KVLedger",
    "MMAConfig",
    "PatchConfig",
    "PatchRuntime",
    "PruneConfig",
    "TokenLayout",
    "VARConfig",
    "adapter_for",
    "apply",
    "calibrate_trend",
    "detach",
    "drop_tokens",
    "drop_visual",
    "efficiency_report",
    "exit_layers",
    "find_sink_dims",
    "from_pretrained",
    "kept_token_grid",
    "mask_visual_after",
    "padding_cache",
    "plot_kept_tokens",
    "sink_dim_scores",
    "status",
]
