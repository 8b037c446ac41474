r"""Fused Triton kernels for metadata-masked attention: forward (with VAR), backward, score taps.

Naming ladder: ``_attention_fwd_kernel`` / ``_attention_bwd_dkdv_kernel`` / ``_attention_bwd_dq_kernel`` /
``_attention_taps_kernel`` (Triton programs) -> :func:`attention_forward` / :func:`attention_backward` /
:func:`attention_taps_forward` (host launchers) -> :class:`AttentionFunction` (``torch.autograd.Function``). The
module is imported lazily by the dispatcher (:mod:`hf_kan.ops.attention`), so Triton is only needed when it runs.
The math (visibility rule, VAR, backward) is derived in this folder's ``README.md``; the reference is
:mod:`.reference`.

Forward (FlashAttention-2 style): program ``(m, b * H + h)`` owns ``BLOCK_M`` query rows of head ``h`` of sample
``b`` and streams the keys of KV head ``h // G`` in ``BLOCK_N`` tiles (grouped-query attention without expanding
K/V). Per tile it decides visibility from the packed metadata, skips the tile when no key in it can be visible to
any of its rows (a scalar test on the tile's position range), skips the element mask when every key of the tile is
visible to every row (the bulk of a causal prefill), and otherwise updates the online softmax in base 2:
``m`` (running max), ``l`` (running sum), ``acc`` (un-normalised output), all fp32. With VAR it also accumulates
``l_img_all`` (image mass S), ``l_img`` / ``acc_img`` (non-sink image keys) and ``l_sink`` / ``acc_sink`` (sink keys)
with the same rescaling, and combines them at the end. Memory: O(T + S) besides the inputs and the output.

Metadata is packed on the host into int32 ``q_meta (B, T, 3)`` = (position, MMA span end, VAR-eligible flag) and
``k_meta (B, S, 2)`` = (position, flags) with flag bits ``1`` valid, ``2`` text, ``4`` image, ``8`` sink. Positions
must be below 2**30 (the tile test's sentinel).

Backward (mask-only): ``delta_i = sum_d dO_id O_id`` on the host, then one kernel per KV tile accumulating
``dK``/``dV`` over the G query heads of its group and all query tiles (no atomics), and one per query tile
accumulating ``dQ``; both recompute ``P = exp(scale * Q K^T - lse)`` from the saved log-sum-exp.

Taps: program ``(n, b)`` owns ``BLOCK_N`` keys of sample ``b`` and sums ``w_r * P_hrj / H`` over every head and the
chosen query rows, from their saved log-sum-exp: ``(B, S)`` fp32 scores without materialising probabilities.

Compilation: head dim, block sizes and feature flags are ``tl.constexpr``; lengths, the window and the strides that
depend on lengths are runtime arguments excluded from specialisation, so a new sequence length or batch size never
recompiles. fp32 inputs use IEEE fp32 matrix products (no TF32) so the fp32 path matches fp32 SDPA; fp16/bf16
inputs multiply in their dtype and accumulate in fp32 (``DOT_DTYPE``: under the interpreter bf16 operands are
multiplied as fp32 after rounding to bf16, see :func:`_dot_dtype`). Kernels are wrapped on first use per mode
(interpreted or compiled), as in :mod:`hf_kan.ops.rational.triton`, and call no ``@triton.jit`` helpers, so the
interpreter and compiled launches can alternate in one process.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ...errors import BackendUnavailableError, InputLayoutError

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634  # log2(e): scores are kept in base 2 inside the kernels
# kernel-side constants (Triton kernels read module globals only when they are tl.constexpr)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_BIG = tl.constexpr(1 << 30)  # position sentinel of the tile test: real positions are smaller
_MAX_GRID_Y = 65535  # CUDA limit of the second grid dimension

# Builtin reductions with the standard-library combiners (what tl.sum / tl.max / tl.min do): they work both in the
# interpreter (mapped to numpy) and compiled, in any process (see hf_kan.ops.rational.triton).
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min

# q_meta columns and k_meta flag bits
_Q_COLS, _K_COLS = 3, 2
FLAG_VALID, FLAG_TEXT, FLAG_IMAGE, FLAG_SINK = 1, 2, 4, 8


def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    sel_ptr,
    q_meta_ptr,
    k_meta_ptr,
    n_q,
    n_k,
    n_heads,
    kv_group,
    window,
    qk_scale,
    var_p,
    var_rho,
    var_min_image,
    q_stride_b,
    q_stride_h,
    q_stride_t,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_s,
    k_stride_d,
    v_stride_b,
    v_stride_h,
    v_stride_s,
    v_stride_d,
    o_stride_b,
    o_stride_h,
    o_stride_t,
    o_stride_d,
    lse_stride_b,
    lse_stride_h,
    qm_stride_b,
    km_stride_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_MMA: tl.constexpr,
    HAS_VAR: tl.constexpr,
    STORE_LSE: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Output rows ``[m * BLOCK_M, (m + 1) * BLOCK_M)`` of head ``h`` of sample ``b``; grid ``(m tiles, B * H)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    in_dtype = q_ptr.dtype.element_ty  # matrix operands are rounded to the input dtype
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    hk = h // kv_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_in = offs_m < n_q
    d_in = offs_d < HEAD_DIM

    q_tile = tl.load(
        q_ptr + b * q_stride_b + h * q_stride_h + offs_m[:, None] * q_stride_t + offs_d[None, :] * q_stride_d,
        mask=m_in[:, None] & d_in[None, :],
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]
    qm = q_meta_ptr + b * qm_stride_b + offs_m * 3
    q_p = tl.load(qm, mask=m_in, other=0)  # [BLOCK_M] original positions
    # position range of this tile's rows: a key tile outside [q_lo - window, q_hi] is invisible to all of them
    q_lo = tl.reduce(tl.where(m_in, q_p, _BIG), 0, _MIN)
    q_top = tl.reduce(tl.where(m_in, q_p, -_BIG), 0, _MAX)
    q_hi = q_top
    if HAS_MMA:
        q_s = tl.load(qm + 1, mask=m_in, other=0)  # [BLOCK_M] MMA span end
        q_hi = tl.maximum(q_hi, tl.reduce(tl.where(m_in, q_s, -_BIG), 0, _MAX))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    if HAS_VAR:
        l_img_all = tl.full([BLOCK_M], 0.0, tl.float32)
        l_img = tl.full([BLOCK_M], 0.0, tl.float32)
        l_sink = tl.full([BLOCK_M], 0.0, tl.float32)
        acc_img = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        acc_sink = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    k_base = k_ptr + b * k_stride_b + hk * k_stride_h
    v_base = v_ptr + b * v_stride_b + hk * v_stride_h
    km_base = k_meta_ptr + b * km_stride_b
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        n_in = offs_n < n_k
        k_p = tl.load(km_base + offs_n * 2, mask=n_in, other=0)  # [BLOCK_N]
        k_f = tl.load(km_base + offs_n * 2 + 1, mask=n_in, other=0)  # [BLOCK_N] flag bits
        k_lo = tl.reduce(tl.where(n_in, k_p, _BIG), 0, _MIN)
        k_hi = tl.reduce(tl.where(n_in, k_p, -_BIG), 0, _MAX)
        live = k_lo <= q_hi
        if HAS_WINDOW:
            live = live & (k_hi > q_lo - window)
        if live:
            kd_mask = n_in[:, None] & d_in[None, :]
            k_tile = tl.load(
                k_base + offs_n[:, None] * k_stride_s + offs_d[None, :] * k_stride_d, mask=kd_mask, other=0.0
            ).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_D]
            s = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2
            # the element mask is needed unless every key is real, in range and visible to every row of the tile
            partial = (tl.reduce(tl.where(n_in, k_f & 1, 0), 0, _MIN) == 0) | (k_hi > q_lo)
            if HAS_WINDOW:
                partial = partial | (k_lo <= q_top - window)
            if partial:
                kp = k_p[None, :]
                qp = q_p[:, None]
                seen = (kp <= qp) & ((k_f & 1) != 0)[None, :]
                if HAS_WINDOW:
                    seen = seen & (kp > qp - window)
                allowed = seen | (kp == qp)
                if HAS_MMA:
                    allowed = allowed | (((k_f & 2) != 0)[None, :] & (kp > qp) & (kp <= q_s[:, None]))
                s = tl.where(allowed & n_in[None, :], s, float("-inf"))  # rows past n_q are never stored
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m_i - m_safe)  # [BLOCK_M]
            p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N], 0 where hidden
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
            v_tile = tl.load(
                v_base + offs_n[:, None] * v_stride_s + offs_d[None, :] * v_stride_d, mask=kd_mask, other=0.0
            ).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(in_dtype).to(DOT_DTYPE), v_tile, input_precision=PRECISION)
            m_i = m_new
            if HAS_VAR:
                is_img = (k_f & 4) != 0  # [BLOCK_N]
                is_sink = (k_f & 8) != 0
                p_img_all = tl.where(is_img[None, :], p, 0.0)
                p_img = tl.where(((k_f & 12) == 4)[None, :], p, 0.0)  # image, not sink
                p_sink = tl.where(is_sink[None, :], p, 0.0)
                l_img_all = l_img_all * alpha + tl.reduce(p_img_all, 1, _SUM)
                l_img = l_img * alpha + tl.reduce(p_img, 1, _SUM)
                l_sink = l_sink * alpha + tl.reduce(p_sink, 1, _SUM)
                acc_img = acc_img * alpha[:, None]
                acc_sink = acc_sink * alpha[:, None]
                if tl.reduce(is_img.to(tl.int32), 0, _MAX) > 0:  # most tiles hold no image keys, or no sinks
                    acc_img += tl.dot(p_img.to(in_dtype).to(DOT_DTYPE), v_tile, input_precision=PRECISION)
                if tl.reduce(is_sink.to(tl.int32), 0, _MAX) > 0:
                    acc_sink += tl.dot(p_sink.to(in_dtype).to(DOT_DTYPE), v_tile, input_precision=PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    inv_l = 1.0 / l_safe  # [BLOCK_M]
    out = acc * inv_l[:, None]
    row_off = b * lse_stride_b + h * lse_stride_h + offs_m
    if HAS_VAR:
        eligible = (tl.load(qm + 2, mask=m_in, other=0) & 1) != 0
        s_img = l_img_all * inv_l  # S: all image attention
        a_img = l_img * inv_l  # A_img: non-sink image attention
        a_sink = l_sink * inv_l  # A_sink
        sel = eligible & (l_i > 0) & (s_img >= var_min_image) & (a_img >= var_rho * s_img) & (a_img > 0)
        w_sink = tl.where(sel, 1.0 - var_p, 0.0)
        w_img = tl.where(sel, (1.0 - var_p) * a_sink / tl.where(sel, a_img, 1.0), 0.0)
        out = out + (w_img[:, None] * acc_img - w_sink[:, None] * acc_sink) * inv_l[:, None]
        tl.store(sel_ptr + row_off, sel.to(tl.int8), mask=m_in)
    tl.store(
        out_ptr + b * o_stride_b + h * o_stride_h + offs_m[:, None] * o_stride_t + offs_d[None, :] * o_stride_d,
        out.to(out_ptr.dtype.element_ty),
        mask=m_in[:, None] & d_in[None, :],
    )
    if STORE_LSE:
        lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
        tl.store(lse_ptr + row_off, lse, mask=m_in)


def _attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    q_meta_ptr,
    k_meta_ptr,
    n_q,
    n_k,
    n_kv_heads,
    kv_group,
    window,
    qk_scale,
    sm_scale,
    q_stride_b,
    q_stride_h,
    q_stride_t,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_s,
    k_stride_d,
    v_stride_b,
    v_stride_h,
    v_stride_s,
    v_stride_d,
    do_stride_b,
    do_stride_h,
    do_stride_t,
    do_stride_d,
    dk_stride_b,
    dk_stride_h,
    dk_stride_s,
    dk_stride_d,
    lse_stride_b,
    lse_stride_h,
    qm_stride_b,
    km_stride_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_MMA: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """dK, dV of ``BLOCK_N`` keys of KV head ``hk`` of sample ``b``, over its G query heads; grid ``(n, B * H_kv)``.

    ``dv += P^T dO``, ``dk += scale * dS^T Q`` with ``dS = P * (dO V^T - delta)`` (``dv``/``dk`` share strides)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    in_dtype = q_ptr.dtype.element_ty  # matrix operands are rounded to the input dtype
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hk = (pid_bh % n_kv_heads).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < n_k
    d_in = offs_d < HEAD_DIM
    kd_mask = n_in[:, None] & d_in[None, :]
    k_tile = tl.load(
        k_ptr + b * k_stride_b + hk * k_stride_h + offs_n[:, None] * k_stride_s + offs_d[None, :] * k_stride_d,
        mask=kd_mask,
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_D]
    v_tile = tl.load(
        v_ptr + b * v_stride_b + hk * v_stride_h + offs_n[:, None] * v_stride_s + offs_d[None, :] * v_stride_d,
        mask=kd_mask,
        other=0.0,
    ).to(DOT_DTYPE)
    km = k_meta_ptr + b * km_stride_b + offs_n * 2
    k_p = tl.load(km, mask=n_in, other=0)  # [BLOCK_N]
    k_f = tl.load(km + 1, mask=n_in, other=0)
    k_lo = tl.reduce(tl.where(n_in, k_p, _BIG), 0, _MIN)
    k_hi = tl.reduce(tl.where(n_in, k_p, -_BIG), 0, _MAX)
    k_holes = tl.reduce(tl.where(n_in, k_f & 1, 0), 0, _MIN) == 0  # a key is not real, or past n_k
    kp = k_p[None, :]
    k_valid = ((k_f & 1) != 0)[None, :]
    k_text = ((k_f & 2) != 0)[None, :]

    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    for g in range(0, kv_group):
        h = hk * kv_group + g
        q_base = q_ptr + b * q_stride_b + h * q_stride_h
        do_base = do_ptr + b * do_stride_b + h * do_stride_h
        row_base = b * lse_stride_b + h * lse_stride_h
        for start_m in range(0, n_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
            m_in = offs_m < n_q
            qm = q_meta_ptr + b * qm_stride_b + offs_m * 3
            q_p = tl.load(qm, mask=m_in, other=0)
            q_lo = tl.reduce(tl.where(m_in, q_p, _BIG), 0, _MIN)
            q_top = tl.reduce(tl.where(m_in, q_p, -_BIG), 0, _MAX)
            q_hi = q_top
            if HAS_MMA:
                q_s = tl.load(qm + 1, mask=m_in, other=0)
                q_hi = tl.maximum(q_hi, tl.reduce(tl.where(m_in, q_s, -_BIG), 0, _MAX))
            live = k_lo <= q_hi
            if HAS_WINDOW:
                live = live & (k_hi > q_lo - window)
            if live:
                qd_mask = m_in[:, None] & d_in[None, :]
                q_tile = tl.load(
                    q_base + offs_m[:, None] * q_stride_t + offs_d[None, :] * q_stride_d, mask=qd_mask, other=0.0
                ).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]
                do_tile = tl.load(
                    do_base + offs_m[:, None] * do_stride_t + offs_d[None, :] * do_stride_d, mask=qd_mask, other=0.0
                ).to(DOT_DTYPE)
                lse2 = tl.load(lse_ptr + row_base + offs_m, mask=m_in, other=0.0) * _LOG2E  # [BLOCK_M]
                lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # empty rows: P = 0
                delta = tl.load(delta_ptr + row_base + offs_m, mask=m_in, other=0.0)
                # rows past n_q load dO = 0 and delta = 0, so they add nothing to dK and dV
                s = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
                partial = k_holes | (k_hi > q_lo)
                if HAS_WINDOW:
                    partial = partial | (k_lo <= q_top - window)
                if partial:
                    qp = q_p[:, None]
                    seen = (kp <= qp) & k_valid
                    if HAS_WINDOW:
                        seen = seen & (kp > qp - window)
                    allowed = seen | (kp == qp)
                    if HAS_MMA:
                        allowed = allowed | (k_text & (kp > qp) & (kp <= q_s[:, None]))
                    s = tl.where(allowed & n_in[None, :], s, float("-inf"))
                p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N], 0 where hidden
                dv += tl.dot(tl.trans(p.to(in_dtype).to(DOT_DTYPE)), do_tile, input_precision=PRECISION)
                dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(in_dtype).to(DOT_DTYPE)), q_tile, input_precision=PRECISION)
    out_off = b * dk_stride_b + hk * dk_stride_h + offs_n[:, None] * dk_stride_s + offs_d[None, :] * dk_stride_d
    tl.store(dk_ptr + out_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kd_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kd_mask)


def _attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    q_meta_ptr,
    k_meta_ptr,
    n_q,
    n_k,
    n_heads,
    kv_group,
    window,
    qk_scale,
    sm_scale,
    q_stride_b,
    q_stride_h,
    q_stride_t,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_s,
    k_stride_d,
    v_stride_b,
    v_stride_h,
    v_stride_s,
    v_stride_d,
    do_stride_b,
    do_stride_h,
    do_stride_t,
    do_stride_d,
    dq_stride_b,
    dq_stride_h,
    dq_stride_t,
    dq_stride_d,
    lse_stride_b,
    lse_stride_h,
    qm_stride_b,
    km_stride_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_MMA: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """dQ of ``BLOCK_M`` query rows of head ``h`` of sample ``b``: ``dq = scale * dS K``; grid ``(m tiles, B * H)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    in_dtype = q_ptr.dtype.element_ty  # matrix operands are rounded to the input dtype
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    hk = h // kv_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < n_q
    d_in = offs_d < HEAD_DIM
    qd_mask = m_in[:, None] & d_in[None, :]
    q_tile = tl.load(
        q_ptr + b * q_stride_b + h * q_stride_h + offs_m[:, None] * q_stride_t + offs_d[None, :] * q_stride_d,
        mask=qd_mask,
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]
    do_tile = tl.load(
        do_ptr + b * do_stride_b + h * do_stride_h + offs_m[:, None] * do_stride_t + offs_d[None, :] * do_stride_d,
        mask=qd_mask,
        other=0.0,
    ).to(DOT_DTYPE)
    row_off = b * lse_stride_b + h * lse_stride_h + offs_m
    lse2 = tl.load(lse_ptr + row_off, mask=m_in, other=0.0) * _LOG2E  # [BLOCK_M]
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(delta_ptr + row_off, mask=m_in, other=0.0)
    qm = q_meta_ptr + b * qm_stride_b + offs_m * 3
    q_p = tl.load(qm, mask=m_in, other=0)
    q_lo = tl.reduce(tl.where(m_in, q_p, _BIG), 0, _MIN)
    q_top = tl.reduce(tl.where(m_in, q_p, -_BIG), 0, _MAX)
    q_hi = q_top
    if HAS_MMA:
        q_s = tl.load(qm + 1, mask=m_in, other=0)
        q_hi = tl.maximum(q_hi, tl.reduce(tl.where(m_in, q_s, -_BIG), 0, _MAX))
    qp = q_p[:, None]

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    k_base = k_ptr + b * k_stride_b + hk * k_stride_h
    v_base = v_ptr + b * v_stride_b + hk * v_stride_h
    km_base = k_meta_ptr + b * km_stride_b
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        n_in = offs_n < n_k
        k_p = tl.load(km_base + offs_n * 2, mask=n_in, other=0)  # [BLOCK_N]
        k_f = tl.load(km_base + offs_n * 2 + 1, mask=n_in, other=0)
        k_lo = tl.reduce(tl.where(n_in, k_p, _BIG), 0, _MIN)
        k_hi = tl.reduce(tl.where(n_in, k_p, -_BIG), 0, _MAX)
        live = k_lo <= q_hi
        if HAS_WINDOW:
            live = live & (k_hi > q_lo - window)
        if live:
            kd_mask = n_in[:, None] & d_in[None, :]
            k_tile = tl.load(
                k_base + offs_n[:, None] * k_stride_s + offs_d[None, :] * k_stride_d, mask=kd_mask, other=0.0
            ).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_D]
            v_tile = tl.load(
                v_base + offs_n[:, None] * v_stride_s + offs_d[None, :] * v_stride_d, mask=kd_mask, other=0.0
            ).to(DOT_DTYPE)
            s = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            partial = (tl.reduce(tl.where(n_in, k_f & 1, 0), 0, _MIN) == 0) | (k_hi > q_lo)
            if HAS_WINDOW:
                partial = partial | (k_lo <= q_top - window)
            if partial:
                kp = k_p[None, :]
                seen = (kp <= qp) & ((k_f & 1) != 0)[None, :]
                if HAS_WINDOW:
                    seen = seen & (kp > qp - window)
                allowed = seen | (kp == qp)
                if HAS_MMA:
                    allowed = allowed | (((k_f & 2) != 0)[None, :] & (kp > qp) & (kp <= q_s[:, None]))
                s = tl.where(allowed & n_in[None, :], s, float("-inf"))  # rows past n_q are never stored
            p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N], 0 where hidden
            dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(in_dtype).to(DOT_DTYPE), k_tile, input_precision=PRECISION)
    tl.store(
        dq_ptr + b * dq_stride_b + h * dq_stride_h + offs_m[:, None] * dq_stride_t + offs_d[None, :] * dq_stride_d,
        (dq * sm_scale).to(dq_ptr.dtype.element_ty),
        mask=qd_mask,
    )


def _attention_taps_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    w_ptr,
    out_ptr,
    q_meta_ptr,
    k_meta_ptr,
    n_rows,
    n_k,
    n_heads,
    kv_group,
    window,
    qk_scale,
    q_stride_b,
    q_stride_h,
    q_stride_t,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_s,
    k_stride_d,
    lse_stride_b,
    lse_stride_h,
    w_stride_b,
    qm_stride_b,
    km_stride_b,
    out_stride_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_MMA: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """``score[b, j] = sum_r w[b, r] * mean_h P[b, h, r, j]`` for ``BLOCK_N`` keys; grid ``(n tiles, B)``."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < n_k
    d_in = offs_d < HEAD_DIM
    kd_mask = n_in[:, None] & d_in[None, :]
    km = k_meta_ptr + b * km_stride_b + offs_n * 2
    k_p = tl.load(km, mask=n_in, other=0)
    k_f = tl.load(km + 1, mask=n_in, other=0)
    kp = k_p[None, :]
    k_valid = ((k_f & 1) != 0)[None, :]
    k_text = ((k_f & 2) != 0)[None, :]

    score = tl.full([BLOCK_N], 0.0, tl.float32)
    for h in range(0, n_heads):
        hk = h // kv_group
        k_tile = tl.load(
            k_ptr + b * k_stride_b + hk * k_stride_h + offs_n[:, None] * k_stride_s + offs_d[None, :] * k_stride_d,
            mask=kd_mask,
            other=0.0,
        ).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_D]
        for start_r in range(0, n_rows, BLOCK_M):
            offs_r = start_r + tl.arange(0, BLOCK_M)  # [BLOCK_M]
            r_in = offs_r < n_rows
            q_tile = tl.load(
                q_ptr + b * q_stride_b + h * q_stride_h + offs_r[:, None] * q_stride_t + offs_d[None, :] * q_stride_d,
                mask=r_in[:, None] & d_in[None, :],
                other=0.0,
            ).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]
            lse2 = tl.load(lse_ptr + b * lse_stride_b + h * lse_stride_h + offs_r, mask=r_in, other=0.0) * _LOG2E
            lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
            w = tl.load(w_ptr + b * w_stride_b + offs_r, mask=r_in, other=0.0)  # [BLOCK_M]
            qm = q_meta_ptr + b * qm_stride_b + offs_r * 3
            qp = tl.load(qm, mask=r_in, other=0)[:, None]
            s = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            seen = (kp <= qp) & k_valid
            if HAS_WINDOW:
                seen = seen & (kp > qp - window)
            allowed = seen | (kp == qp)
            if HAS_MMA:
                q_s = tl.load(qm + 1, mask=r_in, other=0)[:, None]
                allowed = allowed | (k_text & (kp > qp) & (kp <= q_s))
            allowed = allowed & n_in[None, :] & r_in[:, None]
            p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
            score += tl.reduce(p * w[:, None], 0, _SUM)
    tl.store(out_ptr + b * out_stride_b + offs_n, score / n_heads, mask=n_in)


# Runtime arguments that depend on lengths: never specialised, so new lengths reuse the compiled kernels. The q/k/v
# strides are left specialised: with head dims that are multiples of 16 they are multiples of 16 for every length,
# which keeps vectorised loads.
_LENGTH_ARGS = ["n_q", "n_k", "n_rows", "window", "lse_stride_b", "lse_stride_h", "qm_stride_b", "km_stride_b",
                "w_stride_b", "out_stride_b"]


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at every call, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_KERNELS = (_attention_fwd_kernel, _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel, _attention_taps_kernel)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """The (forward, dK/dV, dQ, taps) kernels, interpreted or compiled; built once per mode and process."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return tuple(InterpretedFunction(fn) for fn in _KERNELS)
    import inspect

    from triton.runtime.jit import JITFunction

    out = []
    for fn in _KERNELS:
        names = set(inspect.signature(fn).parameters)
        out.append(JITFunction(fn, do_not_specialize=[a for a in _LENGTH_ARGS if a in names]))
    return tuple(out)


def _launch_context(t: torch.Tensor, interpret: bool):
    """Device guard for compiled CUDA launches (the interpreter needs none)."""
    return torch.cuda.device(t.device) if t.is_cuda and not interpret else contextlib.nullcontext()


def check_triton_inputs(q: torch.Tensor) -> None:
    """Raise :class:`BackendUnavailableError` when the Triton backend cannot run on ``q`` here."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise BackendUnavailableError(
            f"the triton attention backend takes float32/float16/bfloat16 inputs, got {q.dtype}; use "
            "backend='reference' for float64"
        )
    if not q.is_cuda and not interpreter_enabled():
        raise BackendUnavailableError(
            f"the triton attention backend needs CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 to run "
            "the kernels in Triton's (slow) interpreter, or use backend='sdpa' / 'reference'"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise BackendUnavailableError(
            f"the triton attention backend supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}; use "
            "backend='sdpa' or 'reference'"
        )


# ---------------------------------------------------------------------------------------------------------------
# metadata packing


def pack_query_meta(
    q_pos: torch.Tensor, q_span_end: torch.Tensor | None, var_query: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """``(B, T, 3)`` int32 ``(position, MMA span end, VAR-eligible)`` of the queries (``(1, T)`` inputs broadcast)."""
    t = q_pos.shape[1]
    pos = q_pos.expand(batch, t).to(torch.int32)
    span = pos if q_span_end is None else q_span_end.expand(batch, t).to(torch.int32)
    flag = torch.zeros_like(pos) if var_query is None else var_query.expand(batch, t).to(torch.int32)
    return torch.stack([pos, span, flag], -1)


def pack_key_meta(
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    k_text: torch.Tensor | None,
    var_image: torch.Tensor | None,
    var_sink: torch.Tensor | None,
    batch: int,
) -> torch.Tensor:
    """``(B, S, 2)`` int32 ``(position, flags)`` of the keys; flag bits 1 valid, 2 text, 4 image, 8 sink."""
    s = k_pos.shape[1]
    pos = k_pos.expand(batch, s).to(torch.int32)
    flags = (pos >= 0) if k_valid is None else k_valid.expand(batch, s)
    flags = flags.to(torch.int32)
    for bit, t in ((FLAG_TEXT, k_text), (FLAG_IMAGE, var_image), (FLAG_SINK, var_sink)):
        if t is not None:
            flags = flags | (t.expand(batch, s).to(torch.int32) * bit)
    return torch.stack([pos, flags], -1)


# ---------------------------------------------------------------------------------------------------------------
# launch configuration


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(dtype: torch.dtype, interpret: bool):
    """Operand dtype of ``tl.dot``: the input dtype, except bf16 under the interpreter (Triton 3.x's interpreter
    multiplies bf16 tiles as their raw uint16 bits), where operands are rounded to bf16 and multiplied in fp32:
    the same products a GPU's bf16 tensor cores accumulate in fp32."""
    return tl.float32 if interpret and dtype == torch.bfloat16 else _TL_DTYPES[dtype]


def _fwd_config(head_dim: int, n_q: int, has_var: bool, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward.

    Interpreter: 16 x 16 tiles (several tiles per test shape). GPU: 128 x 64 tiles, 64 x 64 with VAR (three fp32
    accumulators), fewer rows for short query blocks (decode), 8 warps for head dims above 64. Starting points taken
    from FlashAttention-2's Triton settings and checked for register spills with an sm_90 build; not yet tuned on a
    GPU (``benchmarks/attention.py --sweep`` times the alternatives).
    """
    if interpret:
        return 16, 16, 1, 1
    block_m = max(16, min(64 if has_var else 128, triton.next_power_of_2(max(n_q, 1))))
    num_warps = 8 if head_dim > 64 and block_m >= 64 else 4
    return block_m, 64, num_warps, 3 if head_dim <= 64 else 2


def _bwd_config(head_dim: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of both backward kernels (same provenance as the forward's)."""
    if interpret:
        return 16, 16, 1, 1
    return 64, 64, 4 if head_dim <= 64 else 8, 2


def _grid_bh(n_tiles: int, bh: int) -> tuple[int, int]:
    if bh > _MAX_GRID_Y:
        raise InputLayoutError(f"batch x heads = {bh} exceeds the kernel grid limit {_MAX_GRID_Y}; split the batch")
    return (n_tiles, bh)


# ---------------------------------------------------------------------------------------------------------------
# host launchers


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_meta: torch.Tensor,
    k_meta: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    has_mma: bool = False,
    var: tuple[float, float, float] | None = None,
    store_lse: bool = True,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the forward kernel: ``(out, lse, var_selected)``.

    ``q`` ``(B, H, T, D)``, ``k``/``v`` ``(B, H_kv, S, D)`` (any strides), packed metadata from
    :func:`pack_query_meta` / :func:`pack_key_meta`, ``var = (p, rho, min_image_attention)`` or ``None``;
    ``config = (BLOCK_M, BLOCK_N, num_warps, num_stages)`` overrides the launch configuration (tuning). ``out`` is
    ``(B, H, T, D)`` in ``q``'s dtype, stored as a ``(B, T, H, D)``-contiguous tensor (``out.transpose(1, 2)`` is
    contiguous: what Transformers' attention interface returns); ``lse`` ``(B, H, T)`` fp32 natural-log sums
    (``-inf`` for rows with nothing visible) when ``store_lse``; ``var_selected`` ``(B, H, T)`` bool with VAR.
    """
    check_triton_inputs(q)
    bsz, n_heads, n_q, head_dim = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    out = torch.empty(bsz, n_q, n_heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    need_lse = store_lse
    lse = torch.empty(bsz, n_heads, n_q, dtype=torch.float32, device=q.device) if need_lse else None
    sel = torch.empty(bsz, n_heads, n_q, dtype=torch.int8, device=q.device) if var is not None else None
    if out.numel() == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        if sel is not None:
            sel.zero_()
        return out, lse, None if sel is None else sel.bool()
    interpret = interpreter_enabled()
    fwd, _, _, _ = _kernels(interpret)
    block_m, block_n, num_warps, num_stages = config or _fwd_config(head_dim, n_q, var is not None, interpret)
    row_buf = lse if lse is not None else (sel if sel is not None else q)  # any pointer when neither is stored
    p, rho, min_image = var if var is not None else (1.0, 0.0, 0.0)
    with _launch_context(q, interpret):
        fwd[_grid_bh(triton.cdiv(n_q, block_m), bsz * n_heads)](
            q, k, v, out, row_buf, sel if sel is not None else row_buf, q_meta, k_meta,
            n_q, n_k, n_heads, n_heads // n_kv, window or 0, scale * LOG2E, float(p), float(rho), float(min_image),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            n_heads * n_q, n_q, q_meta.stride(0), k_meta.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_WINDOW=window is not None, HAS_MMA=has_mma, HAS_VAR=var is not None, STORE_LSE=need_lse,
            PRECISION=_precision(q.dtype), DOT_DTYPE=_dot_dtype(q.dtype, interpret), num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip
    return out, lse, None if sel is None else sel.view(torch.bool)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_meta: torch.Tensor,
    k_meta: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    has_mma: bool = False,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of the mask-only attention given ``grad_out = dL/dout`` and the forward's ``out``
    and ``lse``; each in its input's shape and dtype (``dk``/``dv`` per KV head, summed over the group).
    ``config`` overrides ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` (tuning)."""
    check_triton_inputs(q)
    bsz, n_heads, n_q, head_dim = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # (B, H, T): sum_d dO * O
    lse = lse.contiguous()
    interpret = interpreter_enabled()
    _, dkdv_kernel, dq_kernel, _ = _kernels(interpret)
    block_m, block_n, num_warps, num_stages = config or _bwd_config(head_dim, interpret)
    group = n_heads // n_kv
    common = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
                  HAS_WINDOW=window is not None, HAS_MMA=has_mma, PRECISION=_precision(q.dtype),
                  DOT_DTYPE=_dot_dtype(q.dtype, interpret), num_warps=num_warps, num_stages=num_stages)
    with _launch_context(q, interpret):
        dkdv_kernel[_grid_bh(triton.cdiv(n_k, block_n), bsz * n_kv)](
            q, k, v, grad_out, lse, delta, dk, dv, q_meta, k_meta,
            n_q, n_k, n_kv, group, window or 0, scale * LOG2E, scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(),
            n_heads * n_q, n_q, q_meta.stride(0), k_meta.stride(0), **common,
        )  # fmt: skip
        dq_kernel[_grid_bh(triton.cdiv(n_q, block_m), bsz * n_heads)](
            q, k, v, grad_out, lse, delta, dq, q_meta, k_meta,
            n_q, n_k, n_heads, group, window or 0, scale * LOG2E, scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            n_heads * n_q, n_q, q_meta.stride(0), k_meta.stride(0), **common,
        )  # fmt: skip
    return dq, dk, dv


def attention_taps_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    weights: torch.Tensor,
    q_meta: torch.Tensor,
    k_meta: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    has_mma: bool = False,
) -> torch.Tensor:
    """``(B, S)`` fp32 head-averaged, row-weighted attention of the rows ``q`` ``(B, H, R, D)`` (with their
    ``lse`` ``(B, H, R)`` from the forward and ``weights`` ``(B, R)``) to every key."""
    check_triton_inputs(q)
    bsz, n_heads, n_rows, head_dim = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    out = torch.empty(bsz, n_k, dtype=torch.float32, device=q.device)
    if n_k == 0:
        return out
    if n_rows == 0:
        return out.zero_()
    lse = lse.float().contiguous()
    w = weights.float().contiguous()
    interpret = interpreter_enabled()
    taps = _kernels(interpret)[3]
    block_n = 16 if interpret else 64
    with _launch_context(q, interpret):
        taps[_grid_bh(triton.cdiv(n_k, block_n), bsz)](
            q, k, lse, w, out, q_meta, k_meta,
            n_rows, n_k, n_heads, n_heads // n_kv, window or 0, scale * LOG2E,
            *q.stride(), *k.stride(), n_heads * n_rows, n_rows, w.stride(0), q_meta.stride(0), k_meta.stride(0),
            out.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=16, BLOCK_N=block_n,
            HAS_WINDOW=window is not None, HAS_MMA=has_mma, PRECISION=_precision(q.dtype),
            DOT_DTYPE=_dot_dtype(q.dtype, interpret), num_warps=1 if interpret else 4,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# autograd


class AttentionFunction(torch.autograd.Function):
    """Triton forward, Triton backward (mask-only: VAR has no backward here; the dispatcher routes VAR with
    gradients to the reference). Saves q, k, v, the output and the log-sum-exp: O(L) memory."""

    @staticmethod
    def forward(ctx, q, k, v, q_meta, k_meta, scale, window, has_mma, var):
        out, lse, sel = attention_forward(q, k, v, q_meta, k_meta, scale=scale, window=window, has_mma=has_mma,
                                          var=var, store_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, q_meta, k_meta)
        ctx.scale, ctx.window, ctx.has_mma, ctx.var = scale, window, has_mma, var
        sel = sel if sel is not None else lse.new_zeros(0, dtype=torch.bool)
        ctx.mark_non_differentiable(lse, sel)
        return out, lse, sel

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_sel):
        if ctx.var is not None:
            raise BackendUnavailableError(
                "the triton attention kernel has no backward through VAR; compute gradients with backend='reference'"
            )
        q, k, v, out, lse, q_meta, k_meta = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, q_meta, k_meta, scale=ctx.scale,
                                        window=ctx.window, has_mma=ctx.has_mma)
        return dq, dk, dv, None, None, None, None, None, None


__all__ = [
    "AttentionFunction",
    "FLAG_IMAGE",
    "FLAG_SINK",
    "FLAG_TEXT",
    "FLAG_VALID",
    "SUPPORTED_DTYPES",
    "attention_backward",
    "attention_forward",
    "attention_taps_forward",
    "check_triton_inputs",
    "interpreter_enabled",
    "pack_key_meta",
    "pack_query_meta",
]
