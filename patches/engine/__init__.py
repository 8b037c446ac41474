"""The patch engine, for patch authors: the ``"hf_kan"`` attention backend, the hooks, the per-forward state, the
cache ledger, token layouts and masks, token dropping, the ``PatchRuntime`` protocol and the ``PatchSpec`` table.

The engine never imports a patch (``mma/``, ``var/``, ``prune/``, ``dyvte/``): patches import it and register a
``PatchSpec`` (``hf_kan.patches.registry``). Users call ``hf_kan.patches`` instead; see ``patches/DESIGN.md``.
"""

from __future__ import annotations

from .cache import HFKanCache, KVLedger
from .compute import AttentionMetadata, explicit_attention, kernel_compute, sdpa_compute, select_compute
from .config import CONFIG_ATTRIBUTE, PatchConfig
from .dropping import check_no_labels, current_rows, drop_tokens, drop_visual
from .hooks import extra_runtime
from .layout import IMAGE, PAD, TEXT, VIDEO, TokenLayout, VisualItem, build_layout, modality_codes
from .masks import base_mask, metadata_mask
from .options import ApplyContext, argument_options, parse_options
from .runtime import PatchRuntime, visual_outside_last_chunk
from .spec import CliCommand, PatchSpec
from .state import STATE_KWARG, ForwardState

__all__ = [
    "CONFIG_ATTRIBUTE",
    "IMAGE",
    "PAD",
    "STATE_KWARG",
    "TEXT",
    "VIDEO",
    "ApplyContext",
    "AttentionMetadata",
    "CliCommand",
    "ForwardState",
    "HFKanCache",
    "KVLedger",
    "PatchConfig",
    "PatchRuntime",
    "PatchSpec",
    "TokenLayout",
    "VisualItem",
    "argument_options",
    "base_mask",
    "build_layout",
    "check_no_labels",
    "current_rows",
    "drop_tokens",
    "drop_visual",
    "explicit_attention",
    "extra_runtime",
    "kernel_compute",
    "metadata_mask",
    "modality_codes",
    "parse_options",
    "sdpa_compute",
    "select_compute",
    "visual_outside_last_chunk",
]
