"""Metadata-masked attention (causal by original position, padding, MMA, sliding windows), VAR, score taps.

Two public ops, each with backends tested against :mod:`.reference` (derivations in this folder's ``README.md``):

``masked_attention(q, k, v, *, q_pos, k_pos, k_valid=None, q_span_end=None, k_text=None, window=None, scale=None,
var=None, return_lse=False, backend=None)``

- ``q``: ``(B, H, T, D)``; ``k``, ``v``: ``(B, H_kv, S, D)`` with ``H % H_kv == 0`` (grouped-query attention; K/V
  are never expanded). Any strides.
- ``q_pos`` ``(B, T)``, ``k_pos`` ``(B, S)``: integer ORIGINAL positions (column in the full, unpruned sequence,
  padding counted); ``-1`` marks empty slots (a pruned cache's unused key slots, empty query rows). A leading
  dimension of 1 broadcasts over the batch. Must be below 2**30.
- ``k_valid`` ``(B, S)`` bool: the key is a real token (not padding, not an empty slot); default ``k_pos >= 0``.
- ``q_span_end`` ``(B, T)`` + ``k_text`` ``(B, S)`` bool: modality-mutual attention (MMA). Query ``i`` may also see
  TEXT keys ``j`` with ``q_pos[i] < k_pos[j] <= q_span_end[i]``. Set ``q_span_end = q_pos`` for queries MMA does
  not widen (text queries, visual tokens of modalities MMA is not configured for).
- ``window``: sliding window in original positions; keys with ``k_pos > q_pos - window`` stay visible
  (Transformers' ``sliding_window_overlay``, i.e. Mistral / Qwen2 semantics). ``None``: no window.
- ``scale``: score scale, default ``D ** -0.5``.
- ``var``: a :class:`VARSpec` (sink / image flags per key, eligible queries, ``p``, ``rho``,
  ``min_image_attention``): visual attention redistribution applied exactly to the post-softmax probabilities.
- ``return_lse``: return an :class:`AttentionResult` ``(out, lse, var_selected)`` instead of the output alone; ``lse``
  ``(B, H, T)`` fp32 natural log-sum-exp of the scaled scores over visible keys (``-inf`` where nothing is
  visible; what :func:`attention_taps` needs), ``var_selected`` ``(B, H, T)`` bool (rows VAR changed) or ``None``.

Returns ``out`` ``(B, H, T, D)`` in ``q``'s dtype (rows with nothing visible are zeros, never NaN). On the Triton
backend ``out.transpose(1, 2)`` is contiguous (the ``(B, T, H, D)`` layout Transformers' attention interface
returns), so that transpose costs nothing.

``attention_taps(q, k, weights, *, q_pos, k_pos, k_valid=None, q_span_end=None, k_text=None, window=None,
scale=None, lse=None, backend=None)``: ``(B, S)`` fp32 ``score[b, j] = sum_r weights[b, r] * mean_h
alpha[b, h, r, j]`` for the chosen query rows ``q`` ``(B, H, R, D)`` (FastV: the last prompt row with weight 1;
the text-mean variant: the text rows after the image with weights ``1/n``; PDrop: each stage's last instruction row),
under the same visibility rule, without materialising probabilities. ``lse`` ``(B, H, R)``: those rows'
log-sum-exp from :func:`masked_attention` (``return_lse=True``); computed when not given.

Backends (``backend=`` argument; ``None``/``"auto"`` reads ``HF_KAN_ATTENTION_BACKEND``, then ``"auto"``):

- ``"triton"``: the fused kernels (:mod:`.triton`): CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
  fp32/fp16/bf16, head dims up to 256. Forward with VAR and taps; backward (dq, dk, dv) for the mask-only case.
- ``"sdpa"``: the visibility mask materialised as ``(B, 1, T, S)`` bool and torch's SDPA: mask-only, no ``lse``.
- ``"reference"``: explicit probabilities (:func:`masked_attention_reference`): everything, any dtype (float64),
  autograd through VAR too; materialises ``(B, H, T, S)``.
- ``"auto"``: ``"triton"`` on CUDA (and on CPU under ``TRITON_INTERPRET=1``) when the dtype and head dim allow,
  except VAR with gradients required, which goes to ``"reference"``; otherwise ``"sdpa"`` for mask-only calls and
  ``"reference"`` when VAR or ``lse`` is asked for. For taps, ``"sdpa"`` means the reference recomputation.

A backend named explicitly that cannot run the call raises :class:`~hf_kan.errors.BackendUnavailableError`; it is
never silently replaced. Triton is imported only when the Triton backend runs. Nothing here imports Transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import BackendUnavailableError, InputLayoutError
from .._backends import interpreter_requested, triton_available
from .._backends import requested_backend as _requested_backend
from .reference import (
    AttentionResult,
    VARSpec,
    attention_taps_reference,
    check_attention_inputs,
    masked_attention_reference,
    var_redistribute,
    visibility_mask,
)

BACKEND_ENV_VAR = "HF_KAN_ATTENTION_BACKEND"
BACKENDS = ("auto", "reference", "sdpa", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_MAX_HEAD_DIM = 256


def requested_backend(backend: str | None = None) -> str:
    """The backend name asked for: ``backend`` unless ``None``/``"auto"``, else ``HF_KAN_ATTENTION_BACKEND``, else
    ``"auto"``."""
    return _requested_backend(backend, BACKEND_ENV_VAR, BACKENDS, "attention")


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def kernel_eligible(q: torch.Tensor, *, var: bool = False, grad: bool = False) -> bool:
    """The ``"auto"`` rule for the Triton kernel: ``q`` is a CUDA tensor (or a CPU tensor under ``TRITON_INTERPRET=1``)
    of fp32/fp16/bf16 with a head dim the kernel supports, Triton is installed, and the call is not VAR with gradients
    (no kernel backward through VAR). Reads no backend environment variable (the patch engine calls it per forward)."""
    # device first: the CPU default path decides without looking for the package
    return ((q.is_cuda or (q.device.type == "cpu" and interpreter_requested()))
            and q.dtype in _TRITON_DTYPES and q.shape[-1] <= _TRITON_MAX_HEAD_DIM and triton_available()
            and not (var and grad))


def resolve_backend(
    backend: str | None, q: torch.Tensor, *, var: bool = False, lse: bool = False, grad: bool = False
) -> str:
    """Return the concrete backend (``"reference"``, ``"sdpa"`` or ``"triton"``) for a call on ``q``.

    ``var`` / ``lse`` / ``grad``: the call applies VAR / returns the log-sum-exp / needs gradients. ``"auto"``:
    ``"triton"`` when :func:`kernel_eligible`, else ``"reference"`` for VAR or ``lse``, else ``"sdpa"``. Raises
    :class:`BackendUnavailableError` when a backend requested explicitly cannot run the call.
    """
    name = requested_backend(backend)
    if name == "auto":
        if kernel_eligible(q, var=var, grad=grad):
            return "triton"
        return "reference" if var or lse else "sdpa"
    if name == "sdpa" and (var or lse):
        raise BackendUnavailableError(
            "attention backend 'sdpa' computes plain masked attention: it applies no VAR and returns no lse; use "
            "'auto', 'triton' or 'reference'"
        )
    if name == "triton":
        if not triton_available():
            raise BackendUnavailableError(
                "attention backend 'triton' needs the triton package (Linux: pip install triton); use 'auto', "
                "'sdpa' or 'reference'"
            )
        from .triton import check_triton_inputs

        check_triton_inputs(q)
        if var and grad:
            raise BackendUnavailableError(
                "the triton attention kernel has no backward through VAR; run VAR layers under torch.no_grad(), "
                "or use backend='reference' (or 'auto') to train through VAR"
            )
    return name


def _sdpa(q, k, v, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Torch SDPA under the ``(B, T, S)`` visibility mask; rows with nothing visible give zeros (they attend to every
    key inside SDPA, so no NaN reaches the output or the gradients, and are zeroed after)."""
    empty = ~allowed.any(-1)  # (B, T)
    mask = (allowed | empty[..., None])[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(empty[:, None, :, None], 0.0)


def masked_attention(
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
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | AttentionResult:
    """``softmax(scale * q k^T)`` under the metadata visibility rule, times ``v``; VAR applied when ``var`` is given.

    See the module docstring for the arguments, the rule and the backends. Returns ``out`` ``(B, H, T, D)``, or an
    :class:`AttentionResult` ``(out, lse, var_selected)`` with ``return_lse=True``.
    """
    check_attention_inputs(q, k, v, q_pos, k_pos, k_valid, q_span_end, k_text, window, var)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    grad = _needs_grad(q, k, v)
    name = resolve_backend(backend, q, var=var is not None, lse=return_lse, grad=grad)
    if name == "reference":
        res = masked_attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, q_span_end=q_span_end,
                                         k_text=k_text, window=window, scale=scale, var=var)
        return res if return_lse else res.out
    if name == "sdpa":
        allowed = visibility_mask(q_pos, k_pos, k_valid, q_span_end=q_span_end, k_text=k_text, window=window)
        return _sdpa(q, k, v, allowed.expand(q.shape[0], -1, -1), scale)
    from .triton import AttentionFunction, attention_forward, pack_key_meta, pack_query_meta

    b = q.shape[0]
    q_meta = pack_query_meta(q_pos, q_span_end, None if var is None else var.query, b)
    k_meta = pack_key_meta(k_pos, k_valid, k_text, None if var is None else var.image,
                           None if var is None else var.sink, b)
    var_args = None if var is None else (float(var.p), float(var.rho), float(var.min_image_attention))
    has_mma = q_span_end is not None
    if grad:
        out, lse, sel = AttentionFunction.apply(q, k, v, q_meta, k_meta, scale, window, has_mma, var_args)
        sel = sel if var is not None else None
    else:
        out, lse, sel = attention_forward(q, k, v, q_meta, k_meta, scale=scale, window=window, has_mma=has_mma,
                                          var=var_args, store_lse=return_lse)
    return AttentionResult(out, lse, sel) if return_lse else out


def attention_taps(
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
    lse: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``(B, S)`` fp32 ``score[b, j] = sum_r weights[b, r] * mean_h alpha[b, h, r, j]`` for the query rows ``q``
    ``(B, H, R, D)`` (metadata ``q_pos`` / ``q_span_end`` of those rows), ``weights`` ``(B, R)``; see the module
    docstring. No gradients (scores rank tokens)."""
    if weights.dim() != 2 or tuple(weights.shape) != (q.shape[0], q.shape[2]):
        raise InputLayoutError(f"weights must be (B, R) = {(q.shape[0], q.shape[2])}, got {tuple(weights.shape)}")
    if lse is not None and tuple(lse.shape) != tuple(q.shape[:3]):
        raise InputLayoutError(f"lse must be (B, H, R) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    check_attention_inputs(q, k, k, q_pos, k_pos, k_valid, q_span_end, k_text, window)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = resolve_backend(backend, q)
    with torch.no_grad():
        if name != "triton":
            return attention_taps_reference(q, k, weights, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid,
                                            q_span_end=q_span_end, k_text=k_text, window=window, scale=scale)
        from .triton import attention_forward, attention_taps_forward, pack_key_meta, pack_query_meta

        b = q.shape[0]
        q_meta = pack_query_meta(q_pos, q_span_end, None, b)
        k_meta = pack_key_meta(k_pos, k_valid, k_text, None, None, b)
        has_mma = q_span_end is not None
        if lse is None:  # the rows' log-sum-exp from a forward over just those rows
            _, lse, _ = attention_forward(q, k, k, q_meta, k_meta, scale=scale, window=window, has_mma=has_mma)
        return attention_taps_forward(q, k, lse, weights, q_meta, k_meta, scale=scale, window=window,
                                      has_mma=has_mma)


__all__ = [
    "AttentionResult",
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "VARSpec",
    "attention_taps",
    "attention_taps_reference",
    "check_attention_inputs",
    "kernel_eligible",
    "masked_attention",
    "masked_attention_reference",
    "requested_backend",
    "resolve_backend",
    "triton_available",
    "var_redistribute",
    "visibility_mask",
]
