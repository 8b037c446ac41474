"""Qwen2.5-VL (``qwen2_5_vl``): the same token placement as Qwen2-VL (window attention only changes the vision
tower; temporal M-RoPE ids are scaled by seconds per grid, which the position fallback ranks away)."""

from __future__ import annotations

from .base import FamilyAdapter
from .qwen2_vl import visual_items

ADAPTER = FamilyAdapter(model_type="qwen2_5_vl", visual_items=visual_items)
