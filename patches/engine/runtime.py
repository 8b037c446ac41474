"""The interface a patch implements to act during a forward (the plug-in point of MMA, VAR, pruning, DyVTE).

A patch is a validated config dataclass plus a ``PatchRuntime`` subclass, declared together in one ``PatchSpec``
(``engine/spec.py``). For each forward, the model hook instantiates the runtimes of the active patches and puts them on
the ``ForwardState``; the hooks and the backend then call:

- ``annotate_layout(layout, input_ids, offset=..., has_visual=...)`` once, on the new tokens' ``TokenLayout`` before it
  enters the cache ledger: a patch that widens visibility declares it here as per-token metadata (MMA: ``span_end``),
  which masks (and a fused kernel) read;
- ``before_layer(state, layer_idx, hidden_states, kwargs)`` with the residual stream ENTERING each text layer (VAR
  scores sink tokens here; token dropping returns shortened hidden states and calls ``state.drop_rows``);
- ``mask_rule(state, layer_idx, q, k, allowed)`` to widen/narrow the ``(B, T, S)`` bool mask built from metadata
  (``q``/``k``: ``TokenLayout`` of the layer's queries and keys);
- ``probs_transform(state, layer_idx)`` returning a function that rewrites post-softmax probabilities for that
  layer, or ``None`` to keep the fused fast path (VAR on its selected layers); a transform the fused kernel can
  apply itself carries a ``var_spec`` (VAR's);
- ``after_layer(state, layer_idx, hidden_states)`` with the layer's output (DyVTE routers read it here);
- ``observe_attention(state, layer_idx, module, query, key, scaling, lse=...)``: read-only attention inputs, after the
  layer's attention ran (pruning scores; ``lse``: the rows' log-sum-exp when the fused kernel computed the layer);
- ``begin_forward(state, inputs)`` / ``end_forward(state, output)`` once per forward;
- ``prefill_chunk_error(layout, starts)`` before ``generate(..., prefill_chunk_size=N)`` prefills a prompt in several
  forwards: why the patch cannot follow that split exactly (``None``: it can).

Every method has a no-op default; ``changes_mask``/``uses_layer_hooks`` let the backend skip work for patches that do
not need it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .layout import TokenLayout


class PatchRuntime:
    """Per-forward behaviour of one patch; subclasses override only the hooks they need."""

    name: str = ""
    #: whether ``before_layer``/``after_layer``/``observe_attention`` must be called
    uses_layer_hooks: bool = False
    #: whether ``mask_rule`` depends on the layer index (otherwise one mask is shared by layers with equal rows/keys)
    layer_dependent_mask: bool = False

    def __init__(self, config):
        self.config = config

    def annotate_layout(self, layout: TokenLayout, input_ids: torch.Tensor, *, offset: int,
                        has_visual: bool) -> TokenLayout | None:
        """Return the layout of this forward's new tokens with the patch's per-token metadata filled in (or ``None``
        to leave it). ``offset`` is the original position of the first new token; ``has_visual`` whether the forward
        holds visual tokens (known without reading tensors)."""
        return None

    def changes_mask(self, state) -> bool:
        """Whether ``mask_rule`` can change anything in this forward (checked once per forward)."""
        return False

    def mask_rule(self, state, layer_idx: int, q: TokenLayout, k: TokenLayout, allowed: torch.Tensor) -> torch.Tensor:
        return allowed

    def probs_transform(self, state, layer_idx: int) -> Callable[[torch.Tensor, slice], torch.Tensor] | None:
        """A function ``(probs (B, H, t, S) float32, rows: slice) -> probs`` rewriting the layer's post-softmax
        probabilities (the explicit path, ``engine.compute.explicit_attention``), or ``None``. Optional attributes:
        ``first_row`` (rows before it are never changed: they stay on the fused path), ``var_spec`` (``key_length ->
        hf_kan.ops.attention.VARSpec``: the same rewrite as VAR parameters the fused kernel applies in its pass; without
        it the layer runs on the explicit path) and ``record_selected`` (called with the kernel's ``(B, H, T)`` VAR
        selection)."""
        return None

    def before_layer(self, state, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        return None

    def after_layer(self, state, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return None

    def observe_attention(self, state, layer_idx: int, module, query: torch.Tensor, key: torch.Tensor,
                          scaling: float, lse: torch.Tensor | None = None) -> None:
        """Read-only view of a text layer's attention inputs, called by the backend after the layer's attention for
        runtimes with ``uses_layer_hooks``: ``query`` ``(B, H, T, D)`` and ``key`` ``(B, H_kv, S, D)`` (RoPE applied,
        cache included); ``lse`` ``(B, H, T)``: each row's log-sum-exp of the scaled scores over its visible keys
        when the fused kernel computed the layer (``None`` on the SDPA path). Pruning reads one query row's attention
        from them (``hf_kan.ops.attention.attention_taps`` with ``lse``, else a recomputation) instead of asking for
        attention weights."""
        return None

    def begin_forward(self, state, inputs: dict) -> None:
        """Called once per forward after the ``ForwardState`` is built, with the forward's keyword arguments."""
        return None

    def end_forward(self, state, output) -> None:
        """Called once per forward with the model output."""
        return None

    def prefill_chunk_error(self, layout: TokenLayout, starts: list[int]) -> str | None:
        """``None`` when prefilling a prompt whose (annotated) ``layout`` is ``layout`` as separate forwards starting at
        the original positions ``starts`` gives exactly what one forward gives; otherwise a short reason, which the
        engine turns into an error naming ``prefill_chunk_size`` before ``generate`` runs. Default: exact (a patch
        whose every decision is causal, such as VAR)."""
        return None


def visual_outside_last_chunk(layout: TokenLayout, starts: list[int], what: str) -> str | None:
    """A ``prefill_chunk_error`` for patches that decide from the whole prompt at once (token pruning scores with the
    last prompt token; DyVTE's routers read the text after the image): exact only when every visual token is in the
    last chunk, which then holds each image with everything after it."""
    if len(starts) > 1 and bool((layout.visual & (layout.position < starts[-1])).any()):
        return (f"{what} decides from the whole prompt at once (its last token), so every visual token must be in the "
                "last chunk")
    return None


__all__ = ["PatchRuntime", "visual_outside_last_chunk"]
