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
from .families import ADAPTERS, adapter_for
from .layout import IMAGE, PAD, TEXT, VIDEO, TokenLayout
from .runtime import PatchRuntime
from .state import ForwardState
from .var_calibrate import find_sink_dims, sink_dim_scores
from .var_config import VARConfig

backend.register()

__all__ = [
    "ADAPTERS",
    "IMAGE",
    "PAD",
    "TEXT",
    "VIDEO",
    "ForwardState",
    "HFKanCache",
    "KVLedger",
    "MMAConfig",
    "PatchConfig",
    "PatchRuntime",
    "TokenLayout",
    "VARConfig",
    "adapter_for",
    "apply",
    "detach",
    "find_sink_dims",
    "from_pretrained",
    "sink_dim_scores",
    "status",
]
