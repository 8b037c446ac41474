"""Modality-mutual attention (MMA) from AKI, "Seeing is Understanding" (2025).

Rule, on top of the causal base mask: a visual query (image or video token of the configured modalities) may also
attend to TEXT keys that come after it in the prompt, up to and including the last token of the first assistant-turn
opener after its image:

    allowed[b, i, j] |= text(k_j) and q_pos_i < k_pos_j <= span_end_i

``span_end`` is per-token metadata of the ``TokenLayout``, filled in by ``MMARuntime.annotate_layout`` from the
assistant-turn opener (for visual tokens of the configured modalities; everyone else keeps ``span_end == position``).
The engine's mask (``engine.masks.metadata_mask``, i.e. ``hf_kan.ops.attention.reference.visibility_mask``) reads it,
and a fused kernel can read it instead of a mask. Text-to-image and image-to-image stay causal, padding stays hidden,
generated tokens (which come after the opener) are never visible to visual tokens. In cached decoding, the visual
keys/values were computed in prefill with the prompt visible, and new tokens are causal, so decoding equals a full
forward over the same tokens.

The span is found within the forward that holds the image: an image with no opener after it in its forward keeps
plain causal attention (warned once), since keys already in the cache cannot be widened later. A chunked prefill is
therefore exact only when each image and the end of its span fall in the same chunk (checked before ``generate``
runs; ``prefill_chunk_error``).

MMA changes what the model computes: it is meant for checkpoints trained with it; applied to other checkpoints it
can lower accuracy. FlashAttention-2 cannot express this mask, so it is refused.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.utils import logging

from ...ops.attention.reference import visibility_mask
from ..engine.layout import TEXT, TokenLayout, modality_codes
from ..engine.runtime import PatchRuntime

logger = logging.get_logger(__name__)


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


def _of_modalities(layout: TokenLayout, modalities) -> torch.Tensor:
    out = torch.zeros_like(layout.modality, dtype=torch.bool)
    for c in modality_codes(modalities):
        out |= layout.modality == c
    return out


def with_assistant_spans(layout: TokenLayout, input_ids: torch.Tensor, opener: tuple[int, ...], offset: int = 0,
                         modalities=("image", "video")) -> TokenLayout:
    """``layout`` with ``span_end`` of every visual token of ``modalities`` moved to the end of the first ``opener``
    after it (where there is one); other tokens keep ``span_end == position``."""
    nxt = assistant_span_end(input_ids, opener, offset).to(layout.position.device)
    use = _of_modalities(layout, modalities) & (nxt >= 0)
    return dataclasses.replace(layout, span_end=torch.where(use, nxt, layout.span_end))


def mma_rule(q: TokenLayout, k: TokenLayout, allowed: torch.Tensor, modalities=("image", "video")) -> torch.Tensor:
    """``allowed`` (``(B, T, S)`` bool) widened by the MMA term alone: the text keys a query of ``modalities`` sees
    after its own position up to its ``span_end`` (the span term of ``visibility_mask``, for composing by hand)."""
    q_end = torch.where(_of_modalities(q, modalities), q.span_end, q.position)
    spans = visibility_mask(q.position, k.position, k.valid, q_span_end=q_end, k_text=k.modality == TEXT)
    return allowed | (spans & (k.position[:, None, :] > q.position[:, :, None]))


class MMARuntime(PatchRuntime):
    name = "mma"

    def annotate_layout(self, layout, input_ids, *, offset, has_visual):
        if not has_visual:
            return None  # decode steps and text-only forwards: no visual token to widen
        cfg = self.config
        out = with_assistant_spans(layout, input_ids, cfg.assistant_token_ids, offset, cfg.modalities)
        stranded = _of_modalities(out, cfg.modalities) & (out.span_end == out.position)
        if bool(stranded.any()):
            logger.warning_once(
                f"MMA: no assistant-turn opener {list(cfg.assistant_token_ids)} follows some image/video tokens in "
                "their forward, so they keep plain causal attention (build prompts with the chat template's "
                "add_generation_prompt=True, or check mma.assistant_token_ids)"
            )
        return out

    def prefill_chunk_error(self, layout, starts):
        if len(starts) < 2:
            return None
        bounds = torch.tensor(starts[1:], device=layout.position.device)
        widened = layout.span_end > layout.position
        split = torch.bucketize(layout.position, bounds, right=True) != torch.bucketize(layout.span_end, bounds,
                                                                                        right=True)
        if bool((widened & split).any()):
            return ("MMA lets image tokens see the prompt text up to the assistant-turn opener, which a chunk boundary "
                    "separates from them here")
        return None


__all__ = ["MMARuntime", "assistant_span_end", "mma_rule", "with_assistant_spans"]
