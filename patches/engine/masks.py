"""Attention masks derived from token metadata (the pure-PyTorch reference that any fused kernel must match).

``base_mask(q, k)`` is the rule every layer starts from:

    allowed[b, i, j] = (k.position[b, j] <= q.position[b, i] and key j is a real token)
                       or k.position[b, j] == q.position[b, i]

i.e. causal by ORIGINAL position (so it stays right when layers hold different, pruned sets of keys) with padding
keys masked out; a query always sees its own key, so padding rows never become empty (and never produce NaN).
Patches then widen or narrow it (``PatchRuntime.mask_rule``).
"""

from __future__ import annotations

import torch

from .layout import TokenLayout


def base_mask(q: TokenLayout, k: TokenLayout) -> torch.Tensor:
    """``(B, T, S)`` bool: causal by original position, padding keys hidden, every query sees itself."""
    qp = q.position[:, :, None]
    kp = k.position[:, None, :]
    return ((kp <= qp) & k.valid[:, None, :]) | (kp == qp)


def causal_is_trivial(q: TokenLayout, k: TokenLayout) -> bool:
    """Whether ``base_mask`` equals plain causal attention aligned at the end, so SDPA can run without a mask: no
    padding or empty key slots, key positions strictly increasing (``0..S-1``, or the kept subset of a pruned layer)
    and the queries exactly the last ``T`` keys, with ``T == S`` or ``T == 1`` (SDPA's ``is_causal`` aligns the
    triangle top-left, which is wrong for ``1 < T < S``)."""
    return causal_is_trivial_at(q.position, k.position, k.valid)


def causal_is_trivial_at(q_position: torch.Tensor, k_position: torch.Tensor, k_valid: torch.Tensor) -> bool:
    """``causal_is_trivial`` from the query positions ``(B, T)`` and the key positions and validity ``(B, S)`` alone
    (what a decode step needs; saves gathering every layout field of a pruned layer's keys)."""
    s, t = k_position.shape[1], q_position.shape[1]
    if t not in (1, s) or not bool(k_valid.all()):
        return False
    kp = k_position
    if s > 1 and not bool((kp[:, 1:] > kp[:, :-1]).all()):
        return False
    return bool((q_position == kp[:, s - t:]).all())


__all__ = ["base_mask", "causal_is_trivial", "causal_is_trivial_at"]
