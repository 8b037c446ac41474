"""Attention compute paths of the hf_kan backend, and the choice between them.

Two paths compute a text layer's attention (``select_compute`` picks one per call):

- ``"sdpa"`` (the CPU default and the reference): the layer's ``(B, 1, T, S)`` bool mask built from the token metadata
  (``ForwardState.mask_for``) and torch's SDPA, exactly the code path of ``"sdpa"``; on layers where a patch rewrites
  the post-softmax probabilities (VAR), ``explicit_attention`` materialises them, chunked over queries.
- ``"triton"``: the fused kernel :func:`hf_kan.ops.attention.masked_attention`, which decides visibility in the kernel
  from the per-token metadata of ``ForwardState.attention_metadata`` (query / key original positions, key validity,
  MMA spans, the layer's sliding window) instead of a mask, applies VAR inside the same pass when the patch declares
  it as a ``VARSpec``, and returns each row's log-sum-exp for the pruning scorers' ``attention_taps``.

Both return the output as ``(B, T, H, D)``. Patches never call torch attention directly: they declare metadata
(``annotate_layout``), a ``mask_rule`` or a probability transform, and the backend (``engine/backend.py``) routes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from ...errors import BackendUnavailableError
from ...ops.attention import AttentionResult, VARSpec, kernel_eligible, masked_attention, resolve_backend


@dataclass(frozen=True)
class AttentionMetadata:
    """The arguments of :func:`hf_kan.ops.attention.masked_attention` (and of its reference rule
    ``visibility_mask``) for one layer: ``q_pos`` ``(B, T)`` / ``k_pos`` ``(B, S)`` original positions (``-1``: empty
    slot), ``k_valid`` ``(B, S)``, the MMA span ``q_span_end`` ``(B, T)`` with ``k_text`` ``(B, S)`` (both ``None``
    when no span reaches past its token), and the layer's sliding ``window`` (``None``: none)."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    k_valid: torch.Tensor
    q_span_end: torch.Tensor | None
    k_text: torch.Tensor | None
    window: int | None

    def kwargs(self) -> dict:
        return {"q_pos": self.q_pos, "k_pos": self.k_pos, "k_valid": self.k_valid, "q_span_end": self.q_span_end,
                "k_text": self.k_text, "window": self.window}


def select_compute(requested: str, query: torch.Tensor, *, var: bool = False, grad: bool = False,
                   blocker: str | None = None, patched: bool = True) -> str:
    """``"triton"`` or ``"sdpa"`` for one layer call, from the requested backend name (``hf_kan.ops.attention``'s
    names: ``"auto"``, ``"triton"``, ``"sdpa"``, ``"reference"``; the engine's ``"sdpa"`` path, SDPA plus explicit
    probabilities on VAR layers, is also its reference).

    ``"auto"`` follows ``hf_kan.ops.attention.kernel_eligible`` (the kernel for CUDA tensors, and for CPU tensors under
    ``TRITON_INTERPRET=1``; never for VAR with gradients), else ``"sdpa"``; a forward with no active patch
    (``patched=False``) stays on ``"sdpa"``, so every patch off computes exactly what ``"sdpa"`` computes.
    ``blocker`` names what this layer needs that the kernel cannot do (attention dropout, a patch's ``mask_rule``, a
    probability transform with no kernel form): ``"auto"`` then takes ``"sdpa"``, and an explicit ``"triton"``
    raises :class:`BackendUnavailableError`, as it does when the kernel cannot run the call at all.
    """
    if requested in ("sdpa", "reference"):
        return "sdpa"
    if blocker is not None:
        if requested == "triton":
            raise BackendUnavailableError(
                f"the triton attention backend was requested but this layer needs {blocker}, which the fused kernel "
                "cannot compute; unset HF_KAN_ATTENTION_BACKEND (or set it to 'auto') to run such layers on SDPA"
            )
        return "sdpa"
    if requested == "auto":
        return "triton" if patched and kernel_eligible(query, var=var, grad=grad) else "sdpa"
    resolve_backend(requested, query, var=var, grad=grad)  # "triton": raises when the kernel cannot run the call
    return "triton"


def sdpa_compute(module, query, key, value, mask, scaling, dropout, is_causal) -> torch.Tensor:
    """``softmax(Q K^T * scaling + log(mask)) V`` with torch's SDPA (exactly the code path of ``"sdpa"``)."""
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal)
    return out


def kernel_compute(query, key, value, state, layer_idx: int, scaling: float, var: VARSpec | None = None,
                   lse: bool = False) -> tuple[torch.Tensor, AttentionResult | None]:
    """The layer's attention with the fused kernel, from ``state.attention_metadata`` (no mask is built); ``var``:
    VAR applied in the kernel; ``lse``: also return the :class:`AttentionResult` (rows' log-sum-exp, VAR's
    selection). The output ``(B, T, H, D)`` is a free transpose of the kernel's."""
    meta = state.attention_metadata(layer_idx, key.shape[2])
    want = lse or var is not None
    res = masked_attention(query, key, value, **meta.kwargs(), scale=scaling, var=var, return_lse=want,
                           backend="triton")
    return (res.out.transpose(1, 2), res) if want else (res.transpose(1, 2), None)


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


__all__ = ["AttentionMetadata", "explicit_attention", "kernel_compute", "sdpa_compute", "select_compute"]
