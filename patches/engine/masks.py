"""Attention masks derived from token metadata: the engine's side of ONE visibility rule.

The rule itself is :func:`hf_kan.ops.attention.reference.visibility_mask` (the pure-PyTorch reference of the fused
attention kernel, no Transformers import); the engine only reads its arguments from ``TokenLayout`` s:

    allowed[b, i, j] = (k_j <= q_i  and  key j is a real token  and  k_j > q_i - w)
                       or  k_j == q_i
                       or  (key j is text  and  q_i < k_j <= span_end_i)

with ``q_i`` / ``k_j`` ORIGINAL positions (so the rule stays right when layers hold different, pruned sets of keys),
``w`` the layer's sliding window (``None``: no window; Transformers' ``sliding_window_overlay``, ``kv_idx > q_idx -
w``, on original positions) and ``span_end`` the per-token visibility metadata patches fill in
(``PatchRuntime.annotate_layout``; MMA). A query always sees its own key, so padding rows are never empty.
``PatchRuntime.mask_rule`` may then widen or narrow the result further (a test's or a patch's own rule).
"""

from __future__ import annotations

import torch

from ...ops.attention.reference import visibility_mask
from .layout import TEXT, TokenLayout


def base_mask(q: TokenLayout, k: TokenLayout, window: int | None = None) -> torch.Tensor:
    """``(B, T, S)`` bool: causal by original position (within ``window`` positions, when given), padding keys hidden,
    every query sees itself. ``span_end`` is not read (see :func:`metadata_mask`)."""
    return visibility_mask(q.position, k.position, k.valid, window=window)


def metadata_mask(q: TokenLayout, k: TokenLayout, window: int | None = None, *, spans: bool = True) -> torch.Tensor:
    """``(B, T, S)`` bool: the full visibility rule of the module docstring: :func:`base_mask` plus, when ``spans``,
    the text keys each query's ``span_end`` reaches beyond its own position."""
    if not spans:
        return base_mask(q, k, window)
    return visibility_mask(q.position, k.position, k.valid, q_span_end=q.span_end, k_text=k.modality == TEXT,
                           window=window)


def causal_is_trivial(q: TokenLayout, k: TokenLayout, window: int | None = None) -> bool:
    """Whether ``base_mask`` equals plain causal attention aligned at the end, so SDPA can run without a mask: no
    padding or empty key slots, key positions strictly increasing (``0..S-1``, or the kept subset of a pruned layer),
    the queries exactly the last ``T`` keys, with ``T == S`` or ``T == 1`` (SDPA's ``is_causal`` aligns the triangle
    top-left, which is wrong for ``1 < T < S``), and every visible key inside the window."""
    return causal_is_trivial_at(q.position, k.position, k.valid, window)


def causal_is_trivial_at(q_position: torch.Tensor, k_position: torch.Tensor, k_valid: torch.Tensor,
                         window: int | None = None) -> bool:
    """``causal_is_trivial`` from the query positions ``(B, T)`` and the key positions and validity ``(B, S)`` alone
    (what a decode step needs; saves gathering every layout field of a pruned layer's keys)."""
    s, t = k_position.shape[1], q_position.shape[1]
    if t not in (1, s) or not bool(k_valid.all()):
        return False
    kp = k_position
    if s > 1 and not bool((kp[:, 1:] > kp[:, :-1]).all()):
        return False
    if not bool((q_position == kp[:, s - t:]).all()):
        return False
    # keys increase and the last query is the last key: the farthest visible pair is (first key, last query)
    return window is None or bool((q_position[:, -1] - kp[:, 0] < window).all())


__all__ = ["base_mask", "causal_is_trivial", "causal_is_trivial_at", "metadata_mask"]
