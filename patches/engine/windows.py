"""Per-layer sliding windows of a text decoder, read the way Transformers 5.24 reads them.

Transformers builds a sliding-window mask (``masking_utils.create_sliding_window_causal_mask``: causal and
``kv_idx > q_idx - sliding_window``) for a layer when

- the config declares ``layer_types`` and the layer's type is ``"sliding_attention"`` (Qwen2 / Qwen2-VL with
  ``use_sliding_window``, Gemma-style alternating layers), with ``config.sliding_window`` as the window;
- the config declares no ``layer_types`` and ``config.sliding_window`` is set: then every layer slides (Mistral,
  Phi-3; the same rule ``cache_utils.get_layer_types_and_kwargs`` uses to build sliding cache layers),

and only in models whose modeling code builds such masks at all (a Llama config with a stray ``sliding_window``
attribute still attends fully, so the modeling module is checked for ``create_sliding_window_causal_mask``, as
Transformers itself scans modeling sources for ``_can_set_attn_implementation``). The hf_kan masks apply the same
window by ORIGINAL position (``engine.masks``), so pruned layers keep exactly the keys the window allows.

Other layer types (``chunked_attention``, linear attention, ...) and bidirectional text models cannot be expressed by
the metadata mask and are refused with the reason.
"""

from __future__ import annotations

import inspect
import sys

from torch import nn

from ...errors import UnsupportedModelError

FULL, SLIDING = "full_attention", "sliding_attention"


def _builds_sliding_masks(language_model: nn.Module | None) -> bool:
    if language_model is None:
        return True
    module = sys.modules.get(type(language_model).__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):  # no source available: trust the config
        return True
    return "create_sliding_window_causal_mask" in source


def _window(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedModelError(f"{where}: sliding_window must be a positive int, got {value!r}")
    return value


def layer_windows(text_config, num_layers: int, language_model: nn.Module | None = None) -> tuple[int | None, ...]:
    """The sliding window of each of the ``num_layers`` decoder layers (``None`` = full causal attention), from the
    text config (see the module docstring); ``language_model`` (the decoder stack) tells whether its modeling code
    uses sliding windows at all. Raises ``UnsupportedModelError`` for attention the masks cannot express."""
    if not getattr(text_config, "is_causal", True):
        raise UnsupportedModelError(
            "hf_kan patches need a causal text decoder; this config sets is_causal=False (bidirectional attention)"
        )
    sliding_window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    uses_windows = _builds_sliding_masks(language_model)
    if layer_types is None:
        chunk = getattr(text_config, "attention_chunk_size", None)
        if sliding_window is None and chunk is not None and uses_windows:
            raise UnsupportedModelError(
                f"this text model uses chunked attention (attention_chunk_size={chunk}): tokens attend only within "
                "their chunk, which the hf_kan metadata masks do not express"
            )
        if sliding_window is None or not uses_windows:
            return (None,) * num_layers
        return (_window(sliding_window, "the text config"),) * num_layers
    layer_types = list(layer_types)
    if len(layer_types) != num_layers:
        raise UnsupportedModelError(
            f"the text config lists {len(layer_types)} layer_types for {num_layers} decoder layers"
        )
    other = sorted({t for t in layer_types if t not in (FULL, SLIDING)})
    if other:
        raise UnsupportedModelError(
            f"hf_kan patches support full and sliding-window attention layers; this model also has {other}, whose "
            "visibility the metadata masks cannot express"
        )
    if SLIDING in layer_types and uses_windows:
        window = _window(sliding_window, f"layer_types has {SLIDING!r} layers")
        return tuple(window if t == SLIDING else None for t in layer_types)
    return (None,) * num_layers


__all__ = ["FULL", "SLIDING", "layer_windows"]
