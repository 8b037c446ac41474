r"""Pure-PyTorch reference of metadata-masked attention: the visibility rule, VAR and the score taps.

Everything here is short, differentiable, float64-capable, and is what the Triton kernels (:mod:`.triton`) are
tested against. No Transformers import.

**Visibility** (which key ``j`` query ``i`` of sample ``b`` may attend to), from per-token metadata: original
positions ``q_pos`` / ``k_pos`` (the column in the full, unpruned sequence; ``-1`` for empty slots), key validity
``k_valid`` (not padding, not an empty slot), and two optional widenings/narrowings:

.. math::

    \text{allowed}_{bij} = \big(k_j \le q_i \;\wedge\; \text{valid}_j \;\wedge\; k_j > q_i - w\big)
        \;\vee\; k_j = q_i
        \;\vee\; \big(\text{text}_j \;\wedge\; q_i < k_j \le e_i\big)

with ``k_j = k_pos[b, j]``, ``q_i = q_pos[b, i]``, ``w`` the sliding window (``k_j > q_i - w`` is Transformers'
``sliding_window_overlay`` on original positions; no window: that term is always true) and ``e_i = q_span_end[b, i]``
the last position query ``i`` may see under modality-mutual attention (MMA; ``e_i <= q_i`` disables it for the row).
Causal by original position, so it stays right when layers hold different (pruned) key sets; a query always sees
the key at its own position, so a padding row is never empty. A row with nothing visible (e.g. an empty query slot,
``q_pos = -1``, against a cache without ``-1`` slots) gives a zero output and ``lse = -inf``, never NaN.

**VAR** (visual attention redistribution, "See What You Are Told", ICLR 2025), on post-softmax probabilities
``alpha``: per (head, query) row, ``S = sum_{j image} alpha_j``, ``A_img = sum_{j image, not sink} alpha_j``,
``A_sink = sum_{j sink} alpha_j``; the row is selected when the query is eligible, ``S >= min_image_attention``,
``A_img >= rho * S`` and ``A_img > 0``. Selected rows scale sink keys by ``p`` and give the freed mass
``Omega = (1 - p) * A_sink`` to non-sink image keys in proportion to their attention; other rows are unchanged.

**Score taps**: for chosen query rows with weights ``w_bi``, ``score[b, j] = sum_i w_bi * mean_h alpha_bhij`` (the
head-averaged attention FastV / PDrop rank visual tokens by).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ...errors import InputLayoutError


@dataclass(frozen=True)
class VARSpec:
    """What VAR needs besides the attention inputs.

    Args:
        sink: ``(B, S)`` bool, key ``j`` is a sink token (text or visual).
        image: ``(B, S)`` bool, key ``j`` is an image token (sinks included).
        query: ``(B, T)`` bool, query ``i`` may be changed (a real token after the sample's last image).
        p: share of their attention sink keys keep in a selected row (``p = 1`` changes nothing).
        rho: a row is selected when ``A_img >= rho * S`` (the paper's ``r >= rho``).
        min_image_attention: a row is selected only when ``S >= min_image_attention``.
    """

    sink: torch.Tensor
    image: torch.Tensor
    query: torch.Tensor
    p: float = 0.6
    rho: float = 0.8
    min_image_attention: float = 0.2


class AttentionResult(NamedTuple):
    """``out`` ``(B, H, T, D)``; ``lse`` ``(B, H, T)`` float32 natural log-sum-exp of the scaled scores over the
    visible keys (``-inf`` for rows with nothing visible), or ``None``; ``var_selected`` ``(B, H, T)`` bool, the rows
    VAR changed, or ``None`` without VAR."""

    out: torch.Tensor
    lse: torch.Tensor | None
    var_selected: torch.Tensor | None


def _check_2d(name: str, t: torch.Tensor | None, b: int, n: int, what: str, integer: bool) -> None:
    if t is None:
        return
    if t.dim() != 2 or t.shape[0] not in (1, b) or t.shape[1] != n:
        raise InputLayoutError(f"{name} must have shape (B, {what}) = ({b}, {n}), got {tuple(t.shape)}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise InputLayoutError(f"{name} must hold integer original positions, got dtype {t.dtype}")
    if not integer and t.dtype != torch.bool:
        raise InputLayoutError(f"{name} must be a bool tensor, got dtype {t.dtype}")


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    q_span_end: torch.Tensor | None = None,
    k_text: torch.Tensor | None = None,
    window: int | None = None,
    var: VARSpec | None = None,
) -> None:
    """Raise :class:`~hf_kan.errors.InputLayoutError` when shapes, dtypes or devices of the inputs disagree.

    ``q``: ``(B, H, T, D)``; ``k``, ``v``: ``(B, H_kv, S, D)`` with ``H % H_kv == 0``; metadata ``(B, T)`` /
    ``(B, S)`` (a leading 1 broadcasts over the batch).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputLayoutError(
            f"q, k, v must be (B, H, T, D), (B, H_kv, S, D), (B, H_kv, S, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, t, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise InputLayoutError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={b}, H_kv, S, D={d})")
    if k.shape[1] == 0 or h % k.shape[1]:
        raise InputLayoutError(f"the {h} query heads must be a multiple of the {k.shape[1]} key/value heads")
    s = k.shape[2]
    _check_2d("q_pos", q_pos, b, t, "T", True)
    _check_2d("k_pos", k_pos, b, s, "S", True)
    _check_2d("k_valid", k_valid, b, s, "S", False)
    _check_2d("q_span_end", q_span_end, b, t, "T", True)
    _check_2d("k_text", k_text, b, s, "S", False)
    if (q_span_end is None) != (k_text is None):
        raise InputLayoutError("MMA needs both q_span_end (per query) and k_text (per key); got only one of them")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise InputLayoutError(f"window must be a positive int (keys with k_pos > q_pos - window stay), got {window!r}")
    if var is not None:
        _check_2d("var.sink", var.sink, b, s, "S", False)
        _check_2d("var.image", var.image, b, s, "S", False)
        _check_2d("var.query", var.query, b, t, "T", False)
        for name in ("p", "rho", "min_image_attention"):
            value = getattr(var, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InputLayoutError(f"var.{name} must be a number in [0, 1], got {value!r}")
    tensors = [k, v, q_pos, k_pos, k_valid, q_span_end, k_text]
    if var is not None:
        tensors += [var.sink, var.image, var.query]
    devices = {t.device for t in tensors if t is not None}
    if devices != {q.device}:
        raise InputLayoutError(f"every input must be on q's device {q.device}; got {sorted(map(str, devices))}")


def visibility_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    *,
    q_span_end: torch.Tensor | None = None,
    k_text: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """``(B, T, S)`` bool: may query ``i`` see key ``j`` (the rule of the module docstring).

    ``k_valid`` defaults to ``k_pos >= 0``. MMA needs both ``q_span_end`` and ``k_text``.
    """
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    valid = (k_pos >= 0) if k_valid is None else k_valid
    seen = (kp <= qp) & valid[:, None, :]
    if window is not None:
        seen = seen & (kp > qp - window)
    allowed = seen | (kp == qp)
    if q_span_end is not None:
        allowed = allowed | (k_text[:, None, :] & (kp > qp) & (kp <= q_span_end[:, :, None]))
    return allowed


def var_redistribute(
    probs: torch.Tensor,
    sink: torch.Tensor,
    image: torch.Tensor,
    query: torch.Tensor,
    p: float,
    rho: float,
    min_image_attention: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAR rule on post-softmax probabilities (the one definition; see the module docstring).

    Args:
        probs: ``(..., T, S)`` attention probabilities (rows sum to 1, or to 0 for rows with nothing visible).
        sink: ``(..., 1 or T, S)`` bool, key j is a sink token.
        image: ``(..., 1 or T, S)`` bool, key j is an image token.
        query: ``(..., T)`` bool, query i may be changed.
        p, rho, min_image_attention: see :class:`VARSpec`.

    Returns ``(new_probs, selected)``: rows with ``selected`` (``(..., T)`` bool) get sinks scaled by ``p`` and the
    freed mass ``Omega = (1 - p) * A_sink`` added to non-sink image keys proportionally to their attention
    (``alpha_j * (1 + Omega / A_img)``); other rows are returned bit-for-bit unchanged. Row sums are preserved.
    """
    zero = probs.new_zeros(())
    nonsink_image = image & ~sink
    mass_image = torch.where(image, probs, zero).sum(-1)
    mass_nonsink_image = torch.where(nonsink_image, probs, zero).sum(-1)
    mass_sink = torch.where(sink, probs, zero).sum(-1)
    selected = (query & (mass_image >= min_image_attention) & (mass_nonsink_image >= rho * mass_image)
                & (mass_nonsink_image > 0))
    omega = (1.0 - p) * mass_sink
    gain = 1.0 + omega / torch.where(selected, mass_nonsink_image, torch.ones_like(mass_nonsink_image))
    factor = torch.where(sink, probs.new_tensor(p), torch.where(nonsink_image, gain[..., None], probs.new_ones(())))
    return torch.where(selected[..., None], probs * factor, probs), selected


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs (B, H, T, S), lse (B, H, T))`` of ``softmax(scale * q k^T)`` over the ``allowed`` keys
    (``(B, T, S)``), computed in ``q``'s dtype promoted to at least float32; ``k`` may have fewer (grouped) heads.
    Rows with nothing allowed get zero probabilities and ``lse = -inf``."""
    dtype = _compute_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    kc = k.to(dtype).repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.to(dtype), kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    m = scores.amax(-1, keepdim=True).detach()  # softmax is shift-invariant: no gradient through the shift
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    total = e.sum(-1, keepdim=True)
    probs = e / torch.where(total > 0, total, torch.ones_like(total))
    lse = torch.where(total > 0, m + torch.log(total), torch.full_like(total, float("-inf"))).squeeze(-1)
    return probs, lse


def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    q_span_end: torch.Tensor | None = None,
    k_text: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    var: VARSpec | None = None,
) -> AttentionResult:
    """Explicit-probability attention under the visibility rule, with VAR applied when ``var`` is given.

    ``out[b, h, i] = sum_j alpha'_bhij v[b, h // G, j]``, ``alpha = softmax_j(scale * q_bhi . k_b(h//G)j)`` over the
    visible keys and ``alpha' = var_redistribute(alpha)`` (or ``alpha``), ``G = H / H_kv``. ``scale`` defaults to
    ``D ** -0.5``. Computed in ``q``'s dtype promoted to at least float32 (float64 stays float64); the output has
    ``q``'s dtype. Materialises ``(B, H, T, S)`` probabilities: for tests and small inputs.
    """
    check_attention_inputs(q, k, v, q_pos, k_pos, k_valid, q_span_end, k_text, window, var)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    allowed = visibility_mask(q_pos, k_pos, k_valid, q_span_end=q_span_end, k_text=k_text, window=window)
    allowed = allowed.expand(q.shape[0], -1, -1)
    probs, lse = attention_probs(q, k, allowed, scale)
    selected = None
    if var is not None:
        probs, selected = var_redistribute(probs, var.sink[:, None, None, :], var.image[:, None, None, :],
                                           var.query[:, None, :], var.p, var.rho, var.min_image_attention)
    groups = q.shape[1] // k.shape[1]
    vc = v.to(probs.dtype).repeat_interleave(groups, dim=1)
    out = torch.matmul(probs, vc).to(q.dtype)
    return AttentionResult(out, lse.float(), selected)


def attention_taps_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    q_span_end: torch.Tensor | None = None,
    k_text: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``(B, S)`` float32 ``score[b, j] = sum_r weights[b, r] * mean_h alpha_bhrj`` for the query rows ``q``
    (``(B, H, R, D)``, the chosen rows only, with their metadata ``q_pos`` / ``q_span_end`` ``(B, R)``), under the
    visibility rule. ``weights``: ``(B, R)``."""
    if weights.dim() != 2 or weights.shape != (q.shape[0], q.shape[2]):
        raise InputLayoutError(f"weights must be (B, R) = {(q.shape[0], q.shape[2])}, got {tuple(weights.shape)}")
    check_attention_inputs(q, k, k, q_pos, k_pos, k_valid, q_span_end, k_text, window)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    allowed = visibility_mask(q_pos, k_pos, k_valid, q_span_end=q_span_end, k_text=k_text, window=window)
    probs, _ = attention_probs(q, k, allowed.expand(q.shape[0], -1, -1), scale)
    return torch.einsum("br,brs->bs", weights.to(probs.dtype), probs.mean(1)).float()


__all__ = [
    "AttentionResult",
    "VARSpec",
    "attention_probs",
    "attention_taps_reference",
    "check_attention_inputs",
    "masked_attention_reference",
    "var_redistribute",
    "visibility_mask",
]
