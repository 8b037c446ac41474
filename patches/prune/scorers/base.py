"""The scorer interface and the single-row attention every attention-based scorer shares: recomputed under the
layer's mask on the SDPA path (``attention_votes``, the reference), read from the fused kernel's log-sum-exp on the
Triton path (``attention_tap_votes``)."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from ....ops.attention import attention_taps
from ...engine.compute import AttentionMetadata
from ...engine.layout import TokenLayout


def last_prompt_row(q: TokenLayout) -> torch.Tensor:
    """``(B, T)`` one-hot float weights on each sample's last real query row (largest original position)."""
    pos = torch.where(q.valid & (q.position >= 0), q.position, -1)
    last = pos.argmax(-1)
    out = torch.zeros(q.modality.shape, dtype=torch.float32, device=q.position.device)
    out[torch.arange(q.batch_size, device=out.device), last] = 1.0
    return out


def attention_votes(query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool, scaling: float, groups: int) -> torch.Tensor:
    """``(B, S)`` float32 scores: ``score[b, j] = sum_i w[b, i] * mean_h softmax_j(q[b,h,i] . k[b,h,j] * scaling)``
    over the query rows ``i`` with non-zero weight, under the layer's own mask (``(B, 1, T, S)`` bool, or ``None``
    with ``is_causal``). Only the voting rows are recomputed (one row for FastV), in float32."""
    t, s = query.shape[2], key.shape[2]
    rows = weights.ne(0).any(0).nonzero().flatten()
    q = query[:, :, rows].float()  # (B, H, r, D)
    k = repeat_kv(key, groups).float()  # (B, H, S, D)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, r, S)
    if mask is not None:
        allowed = mask[:, :, rows]
    elif is_causal:
        ar = torch.arange(s, device=query.device)
        allowed = (ar[None, :] <= (s - t + rows)[:, None])[None, None]
    else:
        allowed = None
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1).mean(1)  # head average: (B, r, S)
    return torch.einsum("br,brs->bs", weights[:, rows].float(), probs)


def attention_tap_votes(query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor, meta: AttentionMetadata,
                        lse: torch.Tensor, scaling: float) -> torch.Tensor:
    """What :func:`attention_votes` computes, read from the layer's forward instead of recomputed: the voting rows'
    ``lse`` ``(B, H, T)`` (the fused kernel's, ``return_lse=True``) and the layer's metadata ``meta`` feed
    :func:`hf_kan.ops.attention.attention_taps` (``score[b, j] = sum_i w[b, i] mean_h exp(q_bhi . k_bj * scaling -
    lse_bhi)``), which never materialises probabilities."""
    rows = weights.ne(0).any(0).nonzero().flatten()
    span = meta.q_span_end
    return attention_taps(query[:, :, rows], key, weights[:, rows].float(), q_pos=meta.q_pos[:, rows],
                          k_pos=meta.k_pos, k_valid=meta.k_valid, q_span_end=None if span is None else span[:, rows],
                          k_text=meta.k_text, window=meta.window, scale=scaling, lse=lse[:, :, rows],
                          backend="triton")


class Scorer:
    """Scores the visual tokens of a pruning stage from one layer's queries and keys (layer K-1's attention call, or
    layer K's own projections: ``PruneConfig.score_layer``).

    Subclasses set ``name`` and implement ``query_weights``; the score of key ``j`` is the weighted head-averaged
    attention that the chosen query rows pay to it (``attention_votes``)."""

    name: str = ""

    def query_weights(self, q: TokenLayout) -> torch.Tensor:
        """``(B, T)`` non-negative weights over the layer's query rows (each sample's weights sum to 1)."""
        raise TypeError(f"{type(self).__name__} must implement query_weights")

    def __call__(self, q: TokenLayout, query, key, mask, is_causal, scaling, groups) -> torch.Tensor:
        return attention_votes(query, key, self.query_weights(q), mask, is_causal, scaling, groups)

    def taps(self, q: TokenLayout, query, key, meta: AttentionMetadata, lse, scaling) -> torch.Tensor:
        """The same scores from the fused kernel's row log-sum-exp (``attention_tap_votes``)."""
        return attention_tap_votes(query, key, self.query_weights(q), meta, lse, scaling)


__all__ = ["Scorer", "attention_tap_votes", "attention_votes", "last_prompt_row"]
