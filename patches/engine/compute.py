"""Attention compute paths of the hf_kan backend, behind one small interface.

A compute function takes ``(module, query (B,H,T,D), key (B,Hkv,S,D), value, mask, scaling, dropout, is_causal)``
where ``mask`` is ``None`` or a ``(B, 1, T, S)`` bool tensor (True = may attend), and returns the attention output
as ``(B, T, H, D)``. Patches never call torch attention directly, so a fused kernel (the Triton masked attention of
a later issue) slots in by adding an entry to ``COMPUTE`` and selecting it, without touching any patch.

``explicit_attention`` is the path for layers where a patch must see and change the post-softmax probabilities
(VAR): it materialises them, chunked over queries so memory stays bounded, and applies a transform per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

ComputeFn = Callable[..., torch.Tensor]


def sdpa_compute(module, query, key, value, mask, scaling, dropout, is_causal) -> torch.Tensor:
    """``softmax(Q K^T * scaling + log(mask)) V`` with torch's SDPA (exactly the code path of ``"sdpa"``)."""
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal)
    return out


COMPUTE: dict[str, ComputeFn] = {"sdpa": sdpa_compute}


def explicit_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    transform: Callable[[torch.Tensor, slice], torch.Tensor] | None = None,
    chunk_size: int = 256,
    first_row: int = 0,
) -> torch.Tensor:
    """Attention with explicit probabilities: ``P = softmax(Q K^T * scaling, masked)``, ``P <- transform(P, rows)``,
    output ``P V`` as ``(B, T, H, D)``. Queries are processed ``chunk_size`` rows at a time (peak memory
    ``B * H * chunk_size * S`` floats); ``transform`` receives the chunk's probabilities ``(B, H, t, S)`` in float32 and
    the query slice it covers. ``mask`` must not be ``None`` unless ``T == 1`` or ``T == S`` (then causal). Rows before
    ``first_row`` (ones the transform would leave unchanged, e.g. VAR's queries before the image) take the SDPA path."""
    groups = getattr(module, "num_key_value_groups", 1)
    k = repeat_kv(key, groups).float()
    v = repeat_kv(value, groups).float()
    t, s = query.shape[2], k.shape[2]
    if mask is None and t > 1:
        mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)[None, None]
    first_row = min(max(int(first_row), 0), t)
    outs = []
    if first_row > 0:
        head = None if mask is None else mask[:, :, :first_row]
        outs.append(sdpa_compute(module, query[:, :, :first_row], key, value, head, scaling, 0.0, False)
                    .transpose(1, 2).float())
    for start in range(first_row, t, chunk_size):
        rows = slice(start, min(start + chunk_size, t))
        scores = torch.matmul(query[:, :, rows].float(), k.transpose(-1, -2)) * scaling
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, rows], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if transform is not None:
            probs = transform(probs, rows)
        outs.append(torch.matmul(probs, v))
    return torch.cat(outs, 2).to(query.dtype).transpose(1, 2).contiguous()


__all__ = ["COMPUTE", "explicit_attention", "sdpa_compute"]
