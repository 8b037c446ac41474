"""Modality-mutual attention (MMA) from AKI, "Seeing is Understanding" (2025).

Rule, on top of the causal base mask: a visual query (image or video token) may also attend to TEXT keys that come
after it in the prompt, up to and including the last token of the first assistant-turn opener after its image:

    allowed[b, i, j] |= visual(q_i) and text(k_j) and q_pos_i < k_pos_j <= span_end_i

``span_end`` is per-token metadata of the ``TokenLayout``, filled in by ``MMARuntime.annotate_layout`` from the
assistant-turn opener (a fused kernel can read it instead of a mask). Text-to-image and image-to-image stay causal,
padding stays hidden, generated tokens (which come after the opener) are never visible to visual tokens. In cached
decoding, the visual keys/values were computed in prefill with the prompt visible, and new tokens are causal, so
decoding equals a full forward over the same tokens.

MMA changes what the model computes: it is meant for checkpoints trained with it; applied to other checkpoints it
can lower accuracy. FlashAttention-2 cannot express this mask, so it is refused.
"""

from __future__ import annotations

import dataclasses

import torch

from ..engine.layout import TEXT, TokenLayout, modality_codes
from ..engine.runtime import PatchRuntime


def assistant_span_end(input_ids: torch.Tensor, opener: tuple[int, ...] | None, offset: int) -> torch.Tensor:
    """``(B, T)``: for every column t, the original position of the last token of the first occurrence of
    ``opener`` that STARTS after t, or ``-1`` when there is none (or no opener is configured)."""
    b, t = input_ids.shape
    out = torch.full((b, t), -1, dtype=torch.long)
    n = len(opener) if opener else 0
    if n == 0 or t < n:
        return out
    ids = input_ids.cpu()
    pattern = torch.tensor(opener, dtype=ids.dtype)
    starts = (ids.unfold(1, n, 1) == pattern).all(-1)  # (B, T - n + 1): an occurrence starts here
    big = torch.iinfo(torch.long).max
    end_if_start = torch.where(starts, torch.arange(n - 1, t, dtype=torch.long).expand(b, -1), big)
    # next_end[t] = min over s > t of end_if_start[s]: a reversed running minimum, shifted by one column.
    padded = torch.full((b, t + 1), big, dtype=torch.long)
    padded[:, : end_if_start.shape[1]] = end_if_start
    nxt = torch.cummin(padded.flip(1), 1).values.flip(1)[:, 1:]
    found = nxt != big
    out[found] = nxt[found] + offset
    return out


def with_assistant_spans(layout: TokenLayout, input_ids: torch.Tensor, opener: tuple[int, ...],
                         offset: int = 0) -> TokenLayout:
    """``layout`` with ``span_end`` of every visual token moved to the end of the first ``opener`` after it (where
    there is one); other tokens keep ``span_end == position``."""
    nxt = assistant_span_end(input_ids, opener, offset).to(layout.position.device)
    use = layout.visual & (nxt >= 0)
    return dataclasses.replace(layout, span_end=torch.where(use, nxt, layout.span_end))


def mma_rule(q: TokenLayout, k: TokenLayout, allowed: torch.Tensor, modalities=("image", "video")) -> torch.Tensor:
    """Widen a ``(B, T, S)`` bool mask with the MMA rule (see the module docstring)."""
    codes = modality_codes(modalities)
    q_vis = torch.zeros_like(q.modality, dtype=torch.bool)
    for c in codes:
        q_vis |= q.modality == c
    qp = q.position[:, :, None]
    kp = k.position[:, None, :]
    extra = q_vis[:, :, None] & (k.modality == TEXT)[:, None, :] & (kp > qp) & (kp <= q.span_end[:, :, None])
    return allowed | extra


class MMARuntime(PatchRuntime):
    name = "mma"

    def annotate_layout(self, layout, input_ids, *, offset, has_visual):
        if not has_visual:
            return None  # decode steps and text-only forwards: no visual token to widen
        return with_assistant_spans(layout, input_ids, self.config.assistant_token_ids, offset)

    def changes_mask(self, state) -> bool:
        # Only forwards that contain visual queries with a non-empty span are affected (never plain decode steps).
        lay = state.layout
        return bool((lay.visual & (lay.span_end > lay.position)).any())

    def mask_rule(self, state, layer_idx, q, k, allowed):
        return mma_rule(q, k, allowed, self.config.modalities)


__all__ = ["MMARuntime", "assistant_span_end", "mma_rule", "with_assistant_spans"]
