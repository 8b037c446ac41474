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
    """Whether ``base_mask`` equals plain causal attention aligned at the end (no padding, keys ``0..S-1`` in order,
    queries the last ``T`` of them), so SDPA can run without a mask."""
    s, t = k.length, q.length
    if t > s:
        return False
    ar = torch.arange(s, device=k.position.device)
    return bool(k.valid.all()) and bool((k.position == ar).all()) and bool((q.position == ar[s - t:]).all())


__all__ = ["base_mask", "causal_is_trivial"]
