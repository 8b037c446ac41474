"""Scoring a pruning stage with layer K's OWN attention (``PruneConfig.score_layer="own"``), as PyramidDrop releases it.

Before layer K runs, its input norm and query/key projections are applied to the hidden states entering K:

    x = input_layernorm_K(h)                                  h: the rows entering layer K (B, T_K, d)
    q = RoPE(q_proj_K(x[voters]))   k = RoPE(k_proj_K(x))     RoPE at the tokens' ORIGINAL positions
    score[b, j] = sum_i w[b, i] * mean_heads softmax_j(q[b, :, i] . k[b, :, j] * scaling)

over the voter rows ``i`` (FastV/PDrop: each sample's last prompt token) under the layer's mask (causal by original
position, padding hidden, the active patches' mask rules), keys shared across each grouped-query group. Keys of
earlier forwards that layer K already caches join the softmax as they are. Cost: one input norm and one key
projection over the rows entering K plus the query projection of the voter rows, no attention weights requested
from the main kernel.

Differences from the release, kept on purpose: positions stay the original ones (the release renumbers the kept
tokens after each drop, so each group of layers would see other RoPE positions than its cache holds); keys are
repeated over each grouped-query group (the release indexes heads as if there were no GQA); batches of any padding
are scored per sample under the mask (the release handles right padding only).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import InputLayoutError
from ..engine.dropping import sync_layer_inputs
from ..engine.layout import TokenLayout
from ..engine.masks import base_mask
from .scorers.base import Scorer, attention_votes


def decoder_layer(model: nn.Module, layer_idx: int) -> nn.Module:
    """Text decoder layer ``layer_idx`` of ``model`` (through Transformers' ``get_decoder()``)."""
    decoder = model.get_decoder() if model is not None and hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or layer_idx >= len(layers):
        raise InputLayoutError(
            f"pruning with score_layer='own' needs text decoder layer {layer_idx} of the running model, which "
            "model.get_decoder().layers does not provide; use prune={'score_layer': 'previous', ...}"
        )
    return layers[layer_idx]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(B, H, T, D)`` with ``cos`` / ``sin`` ``(B or 1, T, D)`` (the rotate-half form
    Llama and Qwen2 use; Qwen's M-RoPE sections are already merged into cos/sin)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _cached_keys(state, layer_idx: int) -> tuple[torch.Tensor, TokenLayout] | None:
    """Keys layer ``layer_idx`` cached in earlier forwards (RoPE applied) and their layout, or ``None``."""
    cache = state.cache
    if cache is None or state.seen_before == 0 or layer_idx >= len(cache.layers):
        return None
    keys = getattr(cache.layers[layer_idx], "keys", None)
    if keys is None or keys.numel() == 0:
        return None
    ledger = cache.ledger
    held = ledger.key_positions(layer_idx)
    expected = state.seen_before if held is None else held.shape[1]
    if keys.shape[2] != expected:
        raise InputLayoutError(
            f"layer {layer_idx}'s KV cache holds {keys.shape[2]} keys but the hf_kan ledger expects {expected}; use "
            "the cache the previous forward returned unchanged"
        )
    layout = ledger.tokens.narrow(0, state.seen_before) if held is None else ledger.tokens.gather(held)
    return keys, layout


def own_layer_votes(state, layer_idx: int, hidden: torch.Tensor, kwargs: dict,
                    scorer: Scorer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Votes ``(B, S)`` of ``scorer``'s voter rows over the keys of layer ``layer_idx`` computed with that layer's own
    projections from ``hidden`` (the ``(B, T_K, d)`` rows entering it) and its ``kwargs`` (full-length
    ``position_embeddings``); returns the votes and the keys' original positions and validity ``(B, S)``."""
    layer = decoder_layer(state.model, layer_idx)
    attn = layer.self_attn
    pe = {"position_embeddings": kwargs.get("position_embeddings")}
    if not isinstance(pe["position_embeddings"], (tuple, list)):
        raise InputLayoutError(f"decoder layer {layer_idx} got no position_embeddings (cos, sin); pruning with "
                               "score_layer='own' needs them")
    sync_layer_inputs(state, layer_idx, pe)  # cos/sin of the rows entering the layer
    cos, sin = pe["position_embeddings"]
    q_lay = state.query_layout(layer_idx)
    weights = scorer.query_weights(q_lay)
    rows = weights.ne(0).any(0).nonzero().flatten()
    b, t, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    d = getattr(attn, "head_dim", None) or attn.q_proj.out_features // attn.config.num_attention_heads
    query = attn.q_proj(x[:, rows.to(x.device)]).view(b, rows.numel(), -1, d)
    key = attn.k_proj(x).view(b, t, -1, d)
    if hasattr(attn, "q_norm"):  # per-head q/k norms (Qwen3-style layers)
        query, key = attn.q_norm(query), attn.k_norm(key)
    rows_dev = rows.to(cos.device)
    query = rotate(query.transpose(1, 2), cos[:, rows_dev], sin[:, rows_dev])
    key = rotate(key.transpose(1, 2), cos, sin)
    k_lay = q_lay
    cached = _cached_keys(state, layer_idx)
    if cached is not None:
        key = torch.cat([cached[0].to(key.dtype), key], 2)
        k_lay = cached[1].to(q_lay.position.device).cat(q_lay)
    voters = q_lay.gather(rows.to(q_lay.position.device)[None].expand(b, -1))
    allowed = base_mask(voters, k_lay)
    for rt in state.mask_runtimes:
        allowed = rt.mask_rule(state, layer_idx, voters, k_lay, allowed)
    scaling = getattr(attn, "scaling", d ** -0.5)
    groups = getattr(attn, "num_key_value_groups", 1)
    votes = attention_votes(query, key, weights[:, rows.to(weights.device)], allowed[:, None].to(query.device), False,
                            scaling, groups)
    return votes, k_lay.position, k_lay.valid


__all__ = ["decoder_layer", "own_layer_votes", "rotate"]
