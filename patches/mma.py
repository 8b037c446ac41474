"""Modality-mutual attention (MMA) from AKI, "Seeing is Understanding" (2025).

Rule, on top of the causal base mask: a visual query (image or video token) may also attend to TEXT keys that come
after it in the prompt, up to and including the last token of the first assistant-turn opener after its image:

    allowed[b, i, j] |= visual(q_i) and text(k_j) and q_pos_i < k_pos_j <= span_end_i

Text-to-image and image-to-image stay causal, padding stays hidden, generated tokens (which come after the opener)
are never visible to visual tokens. In cached decoding, the visual keys/values were computed in prefill with the
prompt visible, and new tokens are causal, so decoding equals a full forward over the same tokens.

MMA changes what the model computes: it is meant for checkpoints trained with it; applied to other checkpoints it
can lower accuracy. FlashAttention-2 cannot express this mask, so it is refused.
"""

from __future__ import annotations

import torch

from .layout import TEXT, TokenLayout, modality_codes
from .runtime import PatchRuntime


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

    def changes_mask(self, state) -> bool:
        # Only forwards that contain visual queries with a non-empty span are affected (never plain decode steps).
        lay = state.layout
        return bool((lay.visual & (lay.span_end > lay.position)).any())

    def mask_rule(self, state, layer_idx, q, k, allowed):
        return mma_rule(q, k, allowed, self.config.modalities)


__all__ = ["MMARuntime", "mma_rule"]
