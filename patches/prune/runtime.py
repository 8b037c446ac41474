"""Attention-based visual-token pruning (FastV, PDrop) with attention debiasing, on the token-dropping mechanism.

For each stage ``s`` with layer ``K = layers[s]``:

1. the configured scorer computes, for its voting query row(s) only (FastV/PDrop: each sample's last prompt token),
   ``softmax(q K^T * scaling)`` averaged over heads, no attention weights requested from the main kernel. With
   ``score_layer="previous"`` (FastV's rule) it reads layer K-1's queries and keys in that layer's attention call,
   under its own visibility: from the fused kernel's row log-sum-exp (``scorers.attention_tap_votes``) when the
   kernel ran the layer, else recomputed (``scorers.attention_votes``); with ``score_layer="own"`` (PyramidDrop's
   release) it applies layer K's own input norm and query/key projections to the hidden states ENTERING layer K
   (``own_layer.own_layer_votes``, recomputed: that layer's attention has not run yet), with RoPE at the tokens'
   original positions;
2. before layer K runs, each sample keeps its ``floor(r_s * N + 0.5)`` best-scoring visual tokens (``N`` = the
   sample's visual tokens in this forward), optionally after debiasing (``debias.py``), plus all its text;
3. ``engine.dropping.drop_tokens`` shortens the hidden states, the rotary embeddings and the cache ledger from
   layer K on.

Only forwards that contain visual tokens prune (the prefill); decode steps then attend to each layer's cached,
kept positions. With ``use_cache=False`` every forward re-scores and re-prunes its own full sequence, so the keep set
can change from step to step (its voter, the last token, changes).

The record of a forward (scores per stage by column, kept original positions per stage, the padding fractions and
where they came from) is in ``output.hf_kan_state.scratch["prune"]`` (and ``cache.hf_kan_prefill_state`` after
``generate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import HFKanConfigError, InputLayoutError
from ..engine.cache import HFKanCache
from ..engine.dropping import check_no_labels, current_rows, drop_tokens
from ..engine.runtime import PatchRuntime, visual_outside_last_chunk
from .config import PruneConfig
from .debias import (
    debias_scores,
    image_padding_fractions,
    size_padding_fractions,
    token_padding_fractions,
    visual_index,
)
from .own_layer import own_layer_votes
from .scorers import SCORERS

#: attribute of an ``HFKanCache`` holding a ``PaddingTable`` (see ``padding_cache``)
PADDING_ATTRIBUTE = "hf_kan_image_padding"


@dataclass(frozen=True)
class PaddingTable:
    """Per-image padding fractions ``(N, s, s)`` and how they were measured (``"image_sizes"`` or ``"pixels"``)."""

    fractions: torch.Tensor
    source: str


def keep_counts(n_visual: torch.Tensor, ratio: float) -> torch.Tensor:
    """``floor(ratio * N + 0.5)`` visual tokens kept per sample."""
    return torch.floor(n_visual.double() * ratio + 0.5).long()


def select_keep(scores: torch.Tensor, visual: torch.Tensor, real: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool keep mask: every real non-visual row, and each sample's ``k[b]`` highest-scoring visual rows
    (ties broken by earlier row)."""
    masked = torch.where(visual & real, scores.float(), float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (real & ~visual) | (visual & real & (rank < k[:, None]))


class PruneRuntime(PatchRuntime):
    """Per-forward runtime of ``PruneConfig`` (registered as ``"prune"``)."""

    name = "prune"
    uses_layer_hooks = True

    def __init__(self, config: PruneConfig):
        super().__init__(config)
        self.scorer = SCORERS[config.scorer]()
        self.own_layer = config.score_layer == "own"
        self._score_stage = {} if self.own_layer else {k - 1: s for s, k in enumerate(config.layers)}
        self._drop_stage = {k: s for s, k in enumerate(config.layers)}
        self.enabled = False
        self.padding: torch.Tensor | None = None
        self.record: dict = {"scores": {}, "kept": {}, "padding": None, "padding_source": None}

    def prefill_chunk_error(self, layout, starts):
        return visual_outside_last_chunk(layout, starts, "visual-token pruning")

    # --- forward boundaries ----------------------------------------------------------------------------------
    def begin_forward(self, state, inputs: dict) -> None:
        self.enabled = bool(state.layout.visual.any())
        if not self.enabled:
            return
        check_no_labels(inputs, "visual-token pruning")
        state.scratch["prune"] = self.record
        if self.config.debias:
            table = _padding_table(state, inputs)
            if table is not None:
                self.padding = token_padding_fractions(state.layout, table.fractions)
                self.record["padding"] = self.padding
                self.record["padding_source"] = table.source

    def end_forward(self, state, output) -> None:
        return None

    # --- scoring with layer K-1's attention (score_layer="previous") ------------------------------------------
    def observe_attention(self, state, layer_idx, module, query, key, scaling, lse=None) -> None:
        stage = self._score_stage.get(layer_idx)
        if not self.enabled or stage is None:
            return
        with torch.no_grad():
            q = state.query_layout(layer_idx)
            if lse is not None:  # the fused kernel ran the layer: read its rows' log-sum-exp
                votes = self.scorer.taps(q, query, key, state.attention_metadata(layer_idx, key.shape[2]), lse,
                                         scaling)
            else:
                mask, is_causal = state.mask_for(layer_idx, key.shape[2])
                votes = self.scorer(q, query, key, mask, is_causal, scaling,
                                    getattr(module, "num_key_value_groups", 1))
            keys, _ = state.key_layout(layer_idx, key.shape[2])
        self.record["scores"][stage] = scores_by_column(state, votes, keys.position, keys.valid)

    # --- dropping (layer K) -----------------------------------------------------------------------------------
    def before_layer(self, state, layer_idx, hidden_states, kwargs):
        stage = self._drop_stage.get(layer_idx)
        if not self.enabled or stage is None:
            return None
        if self.own_layer:  # score_layer="own": layer K's own q/k on the hidden states entering it
            with torch.no_grad():
                votes, key_position, key_valid = own_layer_votes(state, layer_idx, hidden_states, kwargs,
                                                                 self.scorer)
            self.record["scores"][stage] = scores_by_column(state, votes, key_position, key_valid)
        by_col = self.record["scores"].get(stage)
        if by_col is None:
            raise InputLayoutError(
                f"pruning stage {stage} needs layer {layer_idx - 1}'s attention scores, but that layer did not run "
                "through the hf_kan attention backend with this forward's state"
            )
        rows = current_rows(state, layer_idx)
        cols = torch.where(rows >= 0, rows - state.seen_before, -1)
        lay = state.layout.gather(cols)
        safe = cols.clamp(min=0).to(by_col.device)
        scores = torch.gather(by_col, 1, safe)
        visual, real = lay.visual.to(scores.device), lay.valid.to(scores.device)
        k = keep_counts(state.layout.visual.sum(-1), self.config.keep_ratios[stage]).to(scores.device)
        if self.config.debias and stage in self.config.debias_stages:
            index = torch.gather(visual_index(state.layout.visual).to(scores.device), 1, safe)
            padding = None if self.padding is None else torch.gather(self.padding.to(scores.device), 1, safe)
            scores, is_pad = debias_scores(scores, index, padding, self.config.correction_b,
                                           self.config.padding_threshold)
            if is_pad is not None:
                n_real = (visual & real & ~is_pad).sum(-1)
                k = torch.where(n_real > 0, torch.minimum(k, n_real), k)
        keep = select_keep(scores, visual, real, k)
        out = drop_tokens(state, layer_idx, hidden_states, keep.to(rows.device))
        self.record["kept"][stage] = state.row_positions(layer_idx)
        return out


def scores_by_column(state, votes: torch.Tensor, key_position: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """``(B, t)`` votes placed at the columns of this forward's ``t`` tokens (keys of earlier forwards and empty key
    slots are left out; columns without a key get 0), from ``votes`` ``(B, S)`` over keys at original positions
    ``key_position`` with validity ``key_valid``."""
    t = state.layout.length
    col = key_position.to(votes.device) - state.seen_before
    ok = (col >= 0) & key_valid.to(votes.device)
    by_col = torch.zeros(votes.shape[0], t + 1, dtype=votes.dtype, device=votes.device)
    by_col.scatter_(1, torch.where(ok, col, t), votes)
    return by_col[:, :t]


def _padding_table(state, inputs: dict) -> PaddingTable | None:
    """The padding table of this forward's LLaVA-style square images: the one ``padding_cache`` put on the cache
    (measured from the original image sizes, or from the pixels), else one measured from ``pixel_values`` (the
    fallback); ``None`` without padding information (other families, or ``generate`` without ``padding_cache``)."""
    cached = getattr(state.cache, PADDING_ATTRIBUTE, None) if state.cache is not None else None
    if cached is not None:
        return cached
    pv = inputs.get("pixel_values")
    lay = state.layout
    on_grid = lay.visual & (lay.grid == 0) & (lay.row >= 0)
    if not isinstance(pv, torch.Tensor) or pv.ndim != 4 or bool(lay.newline.any()) or not bool(on_grid.any()):
        return None
    s = int(lay.row[on_grid].max()) + 1
    if pv.shape[-1] != pv.shape[-2] or pv.shape[-1] % s:
        return None
    return PaddingTable(image_padding_fractions(pv, pv.shape[-1] // s), "pixels")


def original_image_sizes(images) -> torch.Tensor:
    """``(N, 2)`` long ``(height, width)`` of each image of ``images`` (PIL images, or arrays / tensors in the
    channel layouts Transformers' image processors accept), in order."""
    from transformers.image_utils import get_image_size, to_numpy_array

    if not isinstance(images, (list, tuple)):
        images = [images]
    sizes = []
    for image in images:
        if hasattr(image, "size") and hasattr(image, "mode"):  # PIL: size = (width, height)
            sizes.append((image.size[1], image.size[0]))
        else:
            sizes.append(tuple(get_image_size(to_numpy_array(image))))
    return torch.tensor(sizes, dtype=torch.long)


def padding_cache(model: nn.Module, pixel_values: torch.Tensor | None = None, *, images=None, image_sizes=None):
    """An empty ``HFKanCache`` carrying the expand-to-square padding of a LLaVA-1.5 batch's images, for
    ``model(**inputs, cache=padding_cache(model, images=images))`` and
    ``model.generate(**inputs, cache=padding_cache(model, images=images))``.

    Give the ORIGINAL images (``images``: what was passed to the processor, in the same order) or their sizes
    (``image_sizes``: ``(height, width)`` per image): the padding of every patch then follows from the geometry of
    expand-to-square (``debias.size_padding_fractions``; the processor's ``pixel_values`` do not record the sizes,
    and ``generate`` never passes ``pixel_values`` to the forward). ``pixel_values`` alone is the fallback: padding
    read from the resized pixels, which under-counts the inner edge of each padding band."""
    given = [name for name, v in (("pixel_values", pixel_values), ("images", images), ("image_sizes", image_sizes))
             if v is not None]
    if len(given) != 1:
        raise HFKanConfigError(
            f"padding_cache takes exactly one of images=, image_sizes= or pixel_values= (got {given or 'none'}); "
            "prefer the original images or their sizes"
        )
    if model.config.model_type != "llava":
        raise HFKanConfigError(
            f"padding suppression applies to LLaVA-1.5's expand-to-square padding; {model.config.model_type!r} "
            "models do not pad their images (LLaVA-NeXT unpads in the model, Qwen tiles the real image)"
        )
    vc = model.config.vision_config
    if pixel_values is not None:
        table = PaddingTable(image_padding_fractions(pixel_values, vc.patch_size), "pixels")
    else:
        sizes = original_image_sizes(images) if images is not None else image_sizes
        table = PaddingTable(size_padding_fractions(sizes, vc.image_size // vc.patch_size), "image_sizes")
    cache = HFKanCache(config=model.config.get_text_config())
    setattr(cache, PADDING_ATTRIBUTE, table)
    return cache


__all__ = ["PADDING_ATTRIBUTE", "PaddingTable", "PruneRuntime", "keep_counts", "original_image_sizes", "padding_cache",
           "scores_by_column", "select_keep"]
