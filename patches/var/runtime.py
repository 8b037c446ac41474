"""Visual attention redistribution (VAR) from "See What You Are Told: Visual Attention Sink in Large Multimodal
Models" (Kang et al., ICLR 2025).

Per configured decoder layer l:

1. **Sink tokens** (text or visual): on the residual stream x entering layer l,
   ``phi(x) = max_{d in D_sink} |x_d / RMS(x)|``; a token is a sink when ``phi > tau``. Scored for every token of
   every forward (prefill and each decode step) and stored per ORIGINAL position in the cache ledger
   (``ledger.token_data["var_sink"]``, ``(B, N, L)`` bool), so decode steps know which cached keys are sinks, also
   when token pruning makes layer l hold a subset of positions.
2. **Queries** (causal): real tokens with at least one image before them, i.e. after the end of the sample's first
   image span (a maximal run of visual tokens of the configured modalities; images directly adjacent, with no text
   token between them, form one span), in prefill and decoding alike. Whether a position is a query never depends on
   what comes after it, so cached decoding over multi-turn, multi-image conversations equals a recompute. Positions
   up to the end of the first image are never changed (for a single-image prompt: exactly the text after the image).
3. **Image-centric rows** per (head, query), on post-softmax probabilities alpha: ``S = sum_{j image} alpha_j``,
   ``A = sum_{j image, not sink} alpha_j``; selected when ``S >= min_image_attention`` and ``A >= rho * S`` (i.e.
   ``r = A / S >= rho``, the paper's convention) and ``A > 0``.
4. **Redistribution** on selected rows: every sink key j (text or visual) gets ``p * alpha_j``; the freed mass
   ``Omega = (1 - p) * sum_{j sink} alpha_j`` goes to non-sink image keys in proportion to their attention,
   ``alpha_j + Omega * alpha_j / A``. Every other entry and every unselected row is left exactly as it was, and row
   sums are preserved.

On VAR layers of forwards with eligible queries, the rule is declared twice, from the same per-key flags: as a
``VARSpec`` (``transform.var_spec``) that the fused Triton kernel applies exactly inside its pass
(``hf_kan.ops.attention``), and as the probability transform of the explicit path (``engine.compute.
explicit_attention``, chunked over queries: the SDPA path and the reference, also used while ``record_var`` keeps a
layer's probabilities). The rule itself is ``hf_kan.ops.attention.var_redistribute`` (one definition).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import InputLayoutError
from ...ops.attention import VARSpec
from ...ops.attention import var_redistribute as redistribute
from ..engine.layout import modality_codes
from ..engine.runtime import PatchRuntime
from .config import VARConfig

SINK_KEY = "var_sink"  # ledger.token_data / state.scratch: (B, N, L) bool sink flags by original position
TRACE_KEY = "var_trace"  # state.scratch: a dict that, when present, receives per-layer diagnostics
SPAN_KEY = "var_first_span_end"  # state.scratch: (B,) end of each sample's first image span, once per forward


def sink_scores(hidden: torch.Tensor, sink_dims: tuple[int, ...] | list[int]) -> torch.Tensor:
    """``phi(x) = max_{d in sink_dims} |x_d / RMS(x)|`` for every row of ``hidden`` (``(..., D)`` -> ``(...)``),
    computed in float32, with ``RMS(x) = sqrt(mean_d x_d^2)``."""
    x = hidden.float()
    rms = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    idx = torch.as_tensor(list(sink_dims), device=x.device)
    return (x.index_select(-1, idx) / rms).abs().amax(-1)


def _table(state, width: int) -> torch.Tensor:
    """This forward's ``(B, N, width)`` sink table (N = all original positions seen, this forward included): the
    cached table of earlier forwards, extended with False rows for the new tokens. Created once per forward."""
    table = state.scratch.get(SINK_KEY)
    if table is not None:
        return table
    lay = state.layout
    total = state.seen_before + lay.length
    table = torch.zeros(lay.batch_size, total, width, dtype=torch.bool, device=lay.position.device)
    ledger = state.cache.ledger if state.cache is not None else None
    prev = ledger.token_data.get(SINK_KEY) if ledger is not None else None
    if prev is not None and prev.shape[0] == lay.batch_size:
        n, w = min(prev.shape[1], state.seen_before), min(prev.shape[2], width)
        table[:, :n, :w] = prev[:, :n, :w].to(table.device)
    state.scratch[SINK_KEY] = table
    if ledger is not None:
        ledger.token_data[SINK_KEY] = table
    return table


def first_span_end(tokens, codes) -> torch.Tensor:
    """``(B,)`` original position of the last token of each sample's first image span (the first maximal run of
    visual tokens of modalities ``codes`` in ``tokens``, a ``TokenLayout`` indexed by original position); ``-1`` when
    the sample has no visual token yet, and ``tokens.length - 1`` while that span is still open (it may continue in
    the next forward, so no position after it has been seen)."""
    vis = torch.zeros_like(tokens.modality, dtype=torch.bool)
    for c in codes:
        vis |= tokens.modality == c
    n = tokens.length
    col = torch.arange(n, device=vis.device).expand_as(vis)
    first = torch.where(vis, col, n).amin(-1)  # (B,) first visual column, n if none
    after = ~vis & (col > first[:, None])
    end = torch.where(after, col, n).amin(-1) - 1  # last column of the first run
    return torch.where(first < n, end, -1)


class VARRuntime(PatchRuntime):
    """Per-forward VAR: scores sink tokens entering each VAR layer and transforms that layer's probabilities."""

    name = "var"
    uses_layer_hooks = True

    def __init__(self, config: VARConfig):
        super().__init__(config)
        if config.layers is None:
            raise InputLayoutError(
                "var.layers is unset in the model config; call hf_kan.patches.apply(model, var=...) so the default "
                "layers (all but the first two and the last) are resolved for this model, or set var.layers"
            )
        self.layers = frozenset(config.layers)
        self.width = max(config.layers) + 1 if config.layers else 0
        self.codes = modality_codes(config.modalities)

    def before_layer(self, state, layer_idx, hidden_states, kwargs):
        if layer_idx not in self.layers:
            return None
        table = _table(state, self.width)
        rows = state.row_positions(layer_idx)
        if rows is None:
            rows = state.layout.position
        valid = state.query_layout(layer_idx).valid & (rows >= 0)
        sinks = (sink_scores(hidden_states, self.config.sink_dims) > self.config.tau) & valid
        b = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(rows)
        safe = rows.clamp(min=0)
        table[b[valid], safe[valid], layer_idx] = sinks[valid]
        trace = state.scratch.get(TRACE_KEY)
        if trace is not None:
            trace.setdefault("sinks", {})[layer_idx] = table[:, :, layer_idx].clone()
        return None

    def probs_transform(self, state, layer_idx) -> Callable[[torch.Tensor, slice], torch.Tensor] | None:
        if layer_idx not in self.layers:
            return None
        table = state.scratch.get(SINK_KEY)
        if table is None:
            raise InputLayoutError(f"VAR found no sink scores for layer {layer_idx}; were the hf_kan layer hooks "
                                   "removed? call hf_kan.patches.apply(model)")
        q = state.query_layout(layer_idx)
        end = state.scratch.get(SPAN_KEY)
        if end is None:
            tokens = state.cache.ledger.tokens if state.cache is not None else state.layout
            end = state.scratch[SPAN_KEY] = first_span_end(tokens, self.codes).to(q.position.device)
        query = q.valid & (end[:, None] >= 0) & (q.position > end[:, None])
        if not bool(query.any()):
            return None  # no query after an image in this forward: VAR is the identity, keep the fast path
        cfg = self.config
        trace = state.scratch.get(TRACE_KEY)
        keys: dict = {}

        def key_flags(s: int) -> tuple[torch.Tensor, torch.Tensor]:
            """``(image, sink)`` ``(B, S)`` bool flags of the layer's ``s`` keys (gathered once)."""
            if "image" not in keys:
                k, _ = state.key_layout(layer_idx, s)
                image = torch.zeros_like(k.modality, dtype=torch.bool)
                for c in self.codes:
                    image |= k.modality == c
                b = torch.arange(k.batch_size, device=k.position.device)[:, None].expand_as(k.position)
                sink = table[b, k.position.clamp(min=0), layer_idx] & (k.position >= 0) & k.valid
                keys["image"], keys["sink"] = image, sink
            return keys["image"], keys["sink"]

        def transform(probs: torch.Tensor, rows: slice) -> torch.Tensor:
            image, sink = key_flags(probs.shape[-1])
            out, selected = redistribute(probs, sink[:, None, None], image[:, None, None], query[:, None, rows], cfg.p,
                                         cfg.rho, cfg.min_image_attention)
            if trace is not None:
                _record(trace, layer_idx, rows, probs, out, selected)
            return out

        def var_spec(s: int) -> VARSpec:
            image, sink = key_flags(s)
            return VARSpec(sink=sink, image=image, query=query, p=cfg.p, rho=cfg.rho,
                           min_image_attention=cfg.min_image_attention)

        # rows before the first eligible query are never changed: the backend computes them on the fused path
        rows_idx = torch.arange(query.shape[1], device=query.device)
        transform.first_row = int(torch.where(query, rows_idx, query.shape[1]).amin())
        if trace is None or trace.get("keep_probs_layer") != layer_idx:  # a recorded layer needs its probabilities
            transform.var_spec = var_spec
        if trace is not None:
            transform.record_selected = lambda selected: _record(trace, layer_idx, slice(0, selected.shape[-1]), None,
                                                                 None, selected)
        return transform


def _record(trace: dict, layer_idx: int, rows: slice, before: torch.Tensor | None, after: torch.Tensor | None,
            selected: torch.Tensor) -> None:
    """Keep diagnostics for ``hf_kan.patches.record_var`` (``var/picture.py``): the selection of every (head,
    query) and, for the requested layer, the probabilities before/after."""
    per_layer = trace.setdefault("layers", {}).setdefault(layer_idx, {"selected": [], "before": [], "after": []})
    per_layer["selected"].append((rows.start, selected.detach().clone()))
    if trace.get("keep_probs_layer") == layer_idx:
        per_layer["before"].append((rows.start, before.detach().clone()))
        per_layer["after"].append((rows.start, after.detach().clone()))


__all__ = ["SINK_KEY", "TRACE_KEY", "VARRuntime", "first_span_end", "redistribute", "sink_scores"]
