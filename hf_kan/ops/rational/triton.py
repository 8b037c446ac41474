r"""Fused Triton kernels for the Group-Rational activation (forward and backward).

Naming ladder: ``_rational_fwd_kernel`` / ``_rational_bwd_kernel`` (Triton programs) ->
:func:`rational_forward` / :func:`rational_backward` (host launchers) -> :class:`RationalFunction`
(``torch.autograd.Function``). The module is imported lazily by the dispatcher, so Triton is only needed
when this backend runs.

Math (per element, group ``g`` of the channel; all in fp32 whatever the input dtype):

.. math::

    P = \sum_{i=0}^{5} a_i x^i, \quad Q = 1 + \sum_{i=1}^{4} |b_i|\,|x|^i, \quad F = P / Q.

Backward, with upstream gradient :math:`\gamma = \partial L / \partial F`:

.. math::

    P' = \sum_{i=1}^{5} i a_i x^{i-1}, \quad
    Q' = \operatorname{sign}(x) \sum_{i=1}^{4} i |b_i|\,|x|^{i-1}, \\
    \frac{\partial L}{\partial x} = \gamma \Big(\frac{P'}{Q} - \frac{P\,Q'}{Q^2}\Big), \quad
    \frac{\partial L}{\partial a_{g,i}} = \sum_{e \in g} \gamma_e \frac{x_e^i}{Q_e}, \quad
    \frac{\partial L}{\partial b_{g,i}} =
        -\operatorname{sign}(b_{g,i}) \sum_{e \in g} \gamma_e \frac{P_e}{Q_e^2}\,|x_e|^i .

``sign(0) = 0`` at both kinks, as in PyTorch's autograd of ``abs``. The kernel therefore accumulates ten sums per
group, ``A_i = sum(gamma / Q * x^i)`` (i = 0..5) and ``B_i = sum(gamma * P / Q^2 * |x|^i)`` (i = 1..4); the host
turns them into ``grad_a = A`` (summed over groups when the numerator is shared) and
``grad_b = -sign(b) * B``.

Reduction strategy (the performance bottleneck of the original KAT kernels, which issued one global atomic per
element and coefficient): each backward program owns one channel group and a strided set of row tiles
``[BLOCK_R, BLOCK_C]``; it accumulates the ten partial sums in fp32 registers over all its tiles, reduces them to
ten scalars once at the end, and then either issues exactly one ``atomic_add`` per coefficient (default) or stores
them to its own slot of a ``[programs, G, 10]`` buffer that the host sums with ``torch.sum`` (deterministic mode:
bit-identical results run to run). The number of row programs is chosen from the SM count, not the tensor size.

Layouts: every input is viewed as ``[B, S, C]`` (batch, rows, channels) with explicit strides. Channels-last
tensors of any leading shape are ``[1, prod(leading), C]``; channels-first tensors ``(N, C, *spatial)`` are
``[N, prod(spatial), C]``. Non-contiguous inputs are used through their strides when the leading (or spatial)
dimensions can be merged into one stride (``torch.reshape`` returns a view); otherwise ``reshape`` copies them to
a contiguous buffer first. Outputs are always contiguous in the input's logical shape and dtype.

Compilation: only channel-dependent values (C, group size, block sizes, flags) are ``tl.constexpr``; row counts and
batch strides are runtime arguments excluded from specialisation, so a new batch size or sequence length never
recompiles. The kernels are wrapped on first use rather than decorated at import time, because Triton fixes
"interpreted or compiled" when ``triton.jit`` runs: here the choice is made per call from ``TRITON_INTERPRET``,
so importing this module in a process never forces later CUDA calls through the interpreter (or vice versa).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ...errors import BackendUnavailableError
from .reference import DENOMINATOR_TERMS, NUMERATOR_TERMS, check_rational_shapes

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_N_SUMS = NUMERATOR_TERMS + DENOMINATOR_TERMS  # ten partial sums per group
_MAX_GRID_Z = 65535  # CUDA limit of the third grid dimension (batch of channels-first inputs)


# ``tl.sum`` is itself a ``@triton.jit`` helper, which Triton's interpreter can only run when ``triton.language`` was
# imported under TRITON_INTERPRET=1 (and, run as a device function, it leaves interpreter patches behind). Reducing
# with the builtin ``tl.reduce`` and the standard-library sum combiner is what ``tl.sum`` does for fp32, works in
# both modes in any process, and lets the interpreter use ``numpy.sum``.
_SUM = tl.standard._sum_combine


def _rational_fwd_kernel(
    x_ptr,
    out_ptr,
    num_ptr,
    den_ptr,
    n_rows,
    x_stride_b,
    x_stride_r,
    x_stride_c,
    out_stride_b,
    out_stride_r,
    out_stride_c,
    num_stride_g,
    C: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One ``[BLOCK_R, BLOCK_C]`` tile of F(x); coefficients are gathered per channel (a tile may span groups)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    col_mask = cols < C
    mask = (rows < n_rows)[:, None] & col_mask[None, :]  # [BLOCK_R, BLOCK_C]

    groups = cols // GROUP_SIZE  # [BLOCK_C]
    a_ptrs = num_ptr + groups * num_stride_g
    b_ptrs = den_ptr + groups * 4
    a0 = tl.load(a_ptrs + 0, mask=col_mask, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_C]
    a1 = tl.load(a_ptrs + 1, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    a2 = tl.load(a_ptrs + 2, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    a3 = tl.load(a_ptrs + 3, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    a4 = tl.load(a_ptrs + 4, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    a5 = tl.load(a_ptrs + 5, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    b1 = tl.abs(tl.load(b_ptrs + 0, mask=col_mask, other=0.0).to(tl.float32))[None, :]
    b2 = tl.abs(tl.load(b_ptrs + 1, mask=col_mask, other=0.0).to(tl.float32))[None, :]
    b3 = tl.abs(tl.load(b_ptrs + 2, mask=col_mask, other=0.0).to(tl.float32))[None, :]
    b4 = tl.abs(tl.load(b_ptrs + 3, mask=col_mask, other=0.0).to(tl.float32))[None, :]

    x_offs = pid_b * x_stride_b + rows[:, None] * x_stride_r + cols[None, :] * x_stride_c
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_C]
    ax = tl.abs(x)
    p = ((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x + a0
    q = (((b4 * ax + b3) * ax + b2) * ax + b1) * ax + 1.0
    out_offs = pid_b * out_stride_b + rows[:, None] * out_stride_r + cols[None, :] * out_stride_c
    tl.store(out_ptr + out_offs, (p / q).to(out_ptr.dtype.element_ty), mask=mask)


def _rational_bwd_kernel(
    x_ptr,
    grad_out_ptr,
    grad_x_ptr,
    num_ptr,
    den_ptr,
    partial_ptr,
    n_rows,
    x_stride_b,
    x_stride_r,
    x_stride_c,
    go_stride_b,
    go_stride_r,
    go_stride_c,
    gx_stride_b,
    gx_stride_r,
    gx_stride_c,
    num_stride_g,
    partial_stride_p,
    batch_offset,
    G: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_COEF: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Backward of one channel group over a strided set of row tiles.

    Grid ``(row_programs, G, batch)``. Program ``(r, g, b)`` visits row tiles ``r, r + row_programs, ...`` of batch
    item ``b`` for the channels of group ``g``, writes ``dL/dx`` for them, and accumulates the ten coefficient sums
    in fp32 ``[BLOCK_R, BLOCK_C]`` registers, reduced to scalars once at the end: one atomic (or one store into the
    program's own partial slot) per coefficient per program.
    """
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    n_row_programs = tl.num_programs(0)

    a_ptr = num_ptr + g * num_stride_g
    b_ptr = den_ptr + g * 4
    a0 = tl.load(a_ptr + 0).to(tl.float32)
    a1 = tl.load(a_ptr + 1).to(tl.float32)
    a2 = tl.load(a_ptr + 2).to(tl.float32)
    a3 = tl.load(a_ptr + 3).to(tl.float32)
    a4 = tl.load(a_ptr + 4).to(tl.float32)
    a5 = tl.load(a_ptr + 5).to(tl.float32)
    b1 = tl.abs(tl.load(b_ptr + 0).to(tl.float32))
    b2 = tl.abs(tl.load(b_ptr + 1).to(tl.float32))
    b3 = tl.abs(tl.load(b_ptr + 2).to(tl.float32))
    b4 = tl.abs(tl.load(b_ptr + 3).to(tl.float32))

    acc_a0 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_a1 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_a2 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_a3 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_a4 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_a5 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_b1 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_b2 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_b3 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_b4 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)

    for c_start in tl.static_range(0, GROUP_SIZE, BLOCK_C):
        in_group = c_start + tl.arange(0, BLOCK_C)  # [BLOCK_C]
        col_mask = in_group < GROUP_SIZE
        cols = g * GROUP_SIZE + in_group
        for r_start in range(pid_r * BLOCK_R, n_rows, n_row_programs * BLOCK_R):
            rows = r_start + tl.arange(0, BLOCK_R).to(tl.int64)  # [BLOCK_R]
            mask = (rows < n_rows)[:, None] & col_mask[None, :]  # [BLOCK_R, BLOCK_C]
            x_offs = pid_b * x_stride_b + rows[:, None] * x_stride_r + cols[None, :] * x_stride_c
            go_offs = pid_b * go_stride_b + rows[:, None] * go_stride_r + cols[None, :] * go_stride_c
            # Masked lanes load x = 0 and gamma = 0, so they add exactly zero to every sum.
            x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_C]
            go = tl.load(grad_out_ptr + go_offs, mask=mask, other=0.0).to(tl.float32)
            ax = tl.abs(x)
            p = ((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x + a0
            q = (((b4 * ax + b3) * ax + b2) * ax + b1) * ax + 1.0
            inv_q = 1.0 / q
            r = go * inv_q  # gamma / Q
            s = r * p * inv_q  # gamma * P / Q^2
            if COMPUTE_DX:
                dp = (((5.0 * a5 * x + 4.0 * a4) * x + 3.0 * a3) * x + 2.0 * a2) * x + a1
                dq_abs = ((4.0 * b4 * ax + 3.0 * b3) * ax + 2.0 * b2) * ax + b1
                sign_x = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
                dx = r * dp - s * sign_x * dq_abs
                gx_offs = pid_b * gx_stride_b + rows[:, None] * gx_stride_r + cols[None, :] * gx_stride_c
                tl.store(grad_x_ptr + gx_offs, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_COEF:
                x2 = x * x
                x3 = x2 * x
                x4 = x2 * x2
                acc_a0 += r
                acc_a1 += r * x
                acc_a2 += r * x2
                acc_a3 += r * x3
                acc_a4 += r * x4
                acc_a5 += r * x4 * x
                acc_b1 += s * ax
                acc_b2 += s * x2
                acc_b3 += s * tl.abs(x3)
                acc_b4 += s * x4

    if COMPUTE_COEF:
        program = batch_offset + pid_b * n_row_programs + pid_r
        slot = partial_ptr + program * partial_stride_p + g * 10
        if ATOMIC:
            tl.atomic_add(slot + 0, tl.reduce(acc_a0, None, _SUM))
            tl.atomic_add(slot + 1, tl.reduce(acc_a1, None, _SUM))
            tl.atomic_add(slot + 2, tl.reduce(acc_a2, None, _SUM))
            tl.atomic_add(slot + 3, tl.reduce(acc_a3, None, _SUM))
            tl.atomic_add(slot + 4, tl.reduce(acc_a4, None, _SUM))
            tl.atomic_add(slot + 5, tl.reduce(acc_a5, None, _SUM))
            tl.atomic_add(slot + 6, tl.reduce(acc_b1, None, _SUM))
            tl.atomic_add(slot + 7, tl.reduce(acc_b2, None, _SUM))
            tl.atomic_add(slot + 8, tl.reduce(acc_b3, None, _SUM))
            tl.atomic_add(slot + 9, tl.reduce(acc_b4, None, _SUM))
        else:
            tl.store(slot + 0, tl.reduce(acc_a0, None, _SUM))
            tl.store(slot + 1, tl.reduce(acc_a1, None, _SUM))
            tl.store(slot + 2, tl.reduce(acc_a2, None, _SUM))
            tl.store(slot + 3, tl.reduce(acc_a3, None, _SUM))
            tl.store(slot + 4, tl.reduce(acc_a4, None, _SUM))
            tl.store(slot + 5, tl.reduce(acc_a5, None, _SUM))
            tl.store(slot + 6, tl.reduce(acc_b1, None, _SUM))
            tl.store(slot + 7, tl.reduce(acc_b2, None, _SUM))
            tl.store(slot + 8, tl.reduce(acc_b3, None, _SUM))
            tl.store(slot + 9, tl.reduce(acc_b4, None, _SUM))


# Runtime arguments that depend on the batch size / sequence length / spatial size: never specialised, so a new
# shape reuses the compiled kernel (Triton would otherwise key on "divisible by 16" and "== 1").
_FWD_NO_SPECIALIZE = ["n_rows", "x_stride_b", "out_stride_b"]
_BWD_NO_SPECIALIZE = ["n_rows", "x_stride_b", "go_stride_b", "gx_stride_b", "batch_offset"]


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at every call, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """The (forward, backward) kernels, interpreted or compiled; built once per mode and process."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_rational_fwd_kernel), InterpretedFunction(_rational_bwd_kernel)
    from triton.runtime.jit import JITFunction

    return (
        JITFunction(_rational_fwd_kernel, do_not_specialize=_FWD_NO_SPECIALIZE),
        JITFunction(_rational_bwd_kernel, do_not_specialize=_BWD_NO_SPECIALIZE),
    )


def _launch_context(t: torch.Tensor, interpret: bool):
    """Device guard for compiled CUDA launches (the interpreter needs none)."""
    return torch.cuda.device(t.device) if t.is_cuda and not interpret else contextlib.nullcontext()


def check_triton_inputs(x: torch.Tensor) -> None:
    """Raise :class:`BackendUnavailableError` when the Triton backend cannot run on ``x`` here."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise BackendUnavailableError(
            f"the triton rational backend computes in fp32 and accepts float32/float16/bfloat16 inputs, got {x.dtype}; "
            "use backend='reference' (or 'cpu' on CPU) for float64"
        )
    if not x.is_cuda and not interpreter_enabled():
        raise BackendUnavailableError(
            f"the triton rational backend needs a CUDA tensor (got one on {x.device}); on CPU set TRITON_INTERPRET=1 "
            "to run the kernels in Triton's (slow) interpreter, or use backend='cpu' / 'reference'"
        )


def _channels_first(x: torch.Tensor, channel_dim: int) -> bool:
    """Normalise ``channel_dim``: ``-1`` / last dim (channels last) or ``1`` with ``x.dim() >= 3`` (channels first)."""
    d = channel_dim % x.dim() if x.dim() else 0
    if d == x.dim() - 1:
        return False
    if d == 1 and x.dim() >= 3:
        return True
    raise ValueError(
        f"channel_dim must be -1 (channels last) or 1 for a channels-first (N, C, *spatial) tensor; "
        f"got channel_dim={channel_dim} for shape {tuple(x.shape)}"
    )


def _as_bsc(t: torch.Tensor, channels_first: bool) -> tuple[torch.Tensor, int, int, int, tuple[int, int, int]]:
    """View ``t`` as ``[B, S, C]``; returns (tensor keeping the storage alive, B, S, C, strides (b, s, c)).

    ``reshape`` returns a view whenever the merged dimensions share one stride, else a contiguous copy.
    """
    if channels_first:
        n, c = t.shape[0], t.shape[1]
        v = t.reshape(n, c, -1)  # [N, C, S]
        return v, n, v.shape[2], c, (v.stride(0), v.stride(2), v.stride(1))
    c = t.shape[-1]
    v = t.reshape(-1, c)  # [S, C]
    return v, 1, v.shape[0], c, (0, v.stride(0), v.stride(1))


def _coefficients(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, channels: int):
    groups = check_rational_shapes(channels, numerator, denominator)
    if numerator.device != x.device or denominator.device != x.device:
        raise ValueError(
            f"rational coefficients live on {numerator.device}/{denominator.device} but the input on {x.device}; "
            "move the module to the input's device"
        )
    num = numerator.detach().contiguous()
    den = denominator.detach().contiguous()
    num_stride_g = 0 if num.shape[0] == 1 else NUMERATOR_TERMS
    return num, den, groups, num_stride_g


def _fwd_blocks(channels: int, channels_first: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the forward: wide along the contiguous dimension, ~2048 elements a tile."""
    if channels_first:
        block_c = min(16, triton.next_power_of_2(channels))
        return 2048 // block_c, block_c, 4
    block_c = next((b for b in (128, 64, 32, 16) if channels % b == 0), min(128, triton.next_power_of_2(channels)))
    return max(1, 2048 // block_c), block_c, 4


def _bwd_blocks(group_size: int, channels_first: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the backward: channels of one group, 512 elements a tile.

    Ten fp32 accumulator tiles live in registers; 512 elements over 4 warps keeps an sm_90 build near 95 registers
    a thread (1024 elements needed ~170, halving occupancy).
    """
    cap = 8 if channels_first else 128
    block_c = min(cap, triton.next_power_of_2(group_size))
    return max(1, 512 // block_c), block_c, 4


def rational_forward(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, *, channel_dim: int = -1
) -> torch.Tensor:
    """Compute F(x) = P(x) / Q(x) per channel group with the Triton forward kernel.

    ``x``: channels-last ``[..., C]`` (``channel_dim=-1``) or channels-first ``(N, C, *spatial)``
    (``channel_dim=1``), fp32/fp16/bf16, CUDA (or CPU under ``TRITON_INTERPRET=1``). Returns a contiguous tensor
    of ``x``'s shape and dtype.
    """
    check_triton_inputs(x)
    channels_first = _channels_first(x, channel_dim)
    channels = x.shape[1] if channels_first else x.shape[-1]
    num, den, groups, num_stride_g = _coefficients(x, numerator, denominator, channels)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    xv, n_batch, n_rows, _, x_strides = _as_bsc(x, channels_first)
    ov, _, _, _, o_strides = _as_bsc(out, channels_first)
    block_r, block_c, num_warps = _fwd_blocks(channels, channels_first)
    interpret = interpreter_enabled()
    fwd_kernel, _ = _kernels(interpret)
    with _launch_context(x, interpret):
        for b0 in range(0, n_batch, _MAX_GRID_Z):
            nb = min(_MAX_GRID_Z, n_batch - b0)
            grid = (triton.cdiv(n_rows, block_r), triton.cdiv(channels, block_c), nb)
            fwd_kernel[grid](
                xv[b0:] if channels_first else xv,
                ov[b0:] if channels_first else ov,
                num,
                den,
                n_rows,
                *x_strides,
                *o_strides,
                num_stride_g,
                C=channels,
                GROUP_SIZE=channels // groups,
                BLOCK_R=block_r,
                BLOCK_C=block_c,
                num_warps=num_warps,
            )
    return out


def _row_programs(x: torch.Tensor, n_row_tiles: int, groups: int, n_batch: int, max_row_programs: int | None) -> int:
    """Row programs per (group, batch item): enough to fill the GPU a few times over, never more than the tiles."""
    if max_row_programs is None:
        if x.is_cuda:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            max_row_programs = triton.cdiv(8 * sms, groups * n_batch)
        else:  # interpreter: few programs, several tiles each, so the in-program loop is exercised
            max_row_programs = 2
    return max(1, min(n_row_tiles, max_row_programs))


def rational_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    *,
    channel_dim: int = -1,
    deterministic: bool = False,
    compute_dx: bool = True,
    compute_coef: bool = True,
    max_row_programs: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of F with respect to ``x``, ``numerator`` and ``denominator`` given ``grad_out = dL/dF``.

    Returns ``(grad_x, grad_numerator, grad_denominator)``; ``grad_x`` has ``x``'s shape and dtype (``None`` when
    ``compute_dx`` is false), the coefficient gradients the coefficients' shapes and dtypes (``None`` when
    ``compute_coef`` is false). Coefficient sums are accumulated in fp32; ``deterministic=True`` replaces the one
    atomic per coefficient per program by per-program partials summed on the host (bit-reproducible).
    ``max_row_programs`` caps the row programs per group (testing hook; default from the SM count).
    """
    check_triton_inputs(x)
    channels_first = _channels_first(x, channel_dim)
    channels = x.shape[1] if channels_first else x.shape[-1]
    num, den, groups, num_stride_g = _coefficients(x, numerator, denominator, channels)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} does not match x shape {tuple(x.shape)}")
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    if not (compute_dx or compute_coef):
        return None, None, None
    xv, n_batch, n_rows, _, x_strides = _as_bsc(x, channels_first)
    gov, _, _, _, go_strides = _as_bsc(grad_out, channels_first)
    if grad_x is not None:
        gxv, _, _, _, gx_strides = _as_bsc(grad_x, channels_first)
    else:  # never written (COMPUTE_DX is a compile-time False); any valid pointer will do
        gxv, gx_strides = xv, x_strides
    group_size = channels // groups
    block_r, block_c, num_warps = _bwd_blocks(group_size, channels_first)
    n_rp = _row_programs(x, triton.cdiv(max(n_rows, 1), block_r), groups, n_batch, max_row_programs)
    atomic = not deterministic
    if atomic:
        partial = torch.zeros(1, groups, _N_SUMS, dtype=torch.float32, device=x.device)
        partial_stride_p = 0
    else:  # every program writes its own slot, so no zero-fill is needed
        partial = torch.empty(n_batch * n_rp, groups, _N_SUMS, dtype=torch.float32, device=x.device)
        partial_stride_p = groups * _N_SUMS
    interpret = interpreter_enabled()
    _, bwd_kernel = _kernels(interpret)
    if x.numel():
        with _launch_context(x, interpret):
            for b0 in range(0, n_batch, _MAX_GRID_Z):
                nb = min(_MAX_GRID_Z, n_batch - b0)
                bwd_kernel[(n_rp, groups, nb)](
                    xv[b0:] if channels_first else xv,
                    gov[b0:] if channels_first else gov,
                    gxv[b0:] if channels_first else gxv,
                    num,
                    den,
                    partial,
                    n_rows,
                    *x_strides,
                    *go_strides,
                    *gx_strides,
                    num_stride_g,
                    partial_stride_p,
                    b0 * n_rp,
                    G=groups,
                    GROUP_SIZE=group_size,
                    BLOCK_R=block_r,
                    BLOCK_C=block_c,
                    COMPUTE_DX=compute_dx,
                    COMPUTE_COEF=compute_coef,
                    ATOMIC=atomic,
                    num_warps=num_warps,
                )
    elif compute_coef:
        partial.zero_()
    if not compute_coef:
        return grad_x, None, None
    sums = partial.sum(0)  # [G, 10], fp32
    grad_num = sums[:, :NUMERATOR_TERMS]
    if numerator.shape[0] == 1:
        grad_num = grad_num.sum(0, keepdim=True)
    grad_den = -torch.sign(den.float()) * sums[:, NUMERATOR_TERMS:]
    return grad_x, grad_num.to(numerator.dtype), grad_den.to(denominator.dtype)


# The launchers as opaque PyTorch operators: ``torch.compile`` of a model that uses this backend puts them in its
# graph as single nodes (shapes from the fake implementations) instead of tracing Triton launches or breaking the
# graph. Outputs that were not asked for come back as empty tensors (operators cannot return None).
@torch.library.custom_op("hf_kan::rational_triton_forward", mutates_args=())
def _forward_op(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return rational_forward(x, numerator, denominator, channel_dim=channel_dim)


@_forward_op.register_fake
def _(x, numerator, denominator, channel_dim):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("hf_kan::rational_triton_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    channel_dim: int,
    deterministic: bool,
    compute_dx: bool,
    compute_coef: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_num, grad_den = rational_backward(
        grad_out,
        x,
        numerator,
        denominator,
        channel_dim=channel_dim,
        deterministic=deterministic,
        compute_dx=compute_dx,
        compute_coef=compute_coef,
    )
    nothing = x.new_empty(0)
    return (
        grad_x if grad_x is not None else nothing,
        grad_num if grad_num is not None else nothing.clone(),
        grad_den if grad_den is not None else nothing.clone(),
    )


@_backward_op.register_fake
def _(grad_out, x, numerator, denominator, channel_dim, deterministic, compute_dx, compute_coef):
    def like(t, wanted):
        return torch.empty(t.shape if wanted else (0,), dtype=t.dtype if wanted else x.dtype, device=x.device)

    return like(x, compute_dx), like(numerator, compute_coef), like(denominator, compute_coef)


class RationalFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward; saves only ``x`` and the coefficients."""

    @staticmethod
    def forward(ctx, x, numerator, denominator, channel_dim=-1, deterministic=False):
        out = _forward_op(x, numerator, denominator, channel_dim)
        ctx.save_for_backward(x, numerator, denominator)
        ctx.channel_dim = channel_dim
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, numerator, denominator = ctx.saved_tensors
        need_x, need_num, need_den = ctx.needs_input_grad[:3]
        grad_x, grad_num, grad_den = _backward_op(
            grad_out, x, numerator, denominator, ctx.channel_dim, ctx.deterministic, need_x, need_num or need_den
        )
        return grad_x if need_x else None, grad_num if need_num else None, grad_den if need_den else None, None, None


def rational_triton(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    *,
    channel_dim: int = -1,
    deterministic: bool = False,
) -> torch.Tensor:
    """Differentiable Group-Rational activation through the Triton kernels (see the module docstring)."""
    return RationalFunction.apply(x, numerator, denominator, channel_dim, deterministic)


__all__ = [
    "RationalFunction",
    "SUPPORTED_DTYPES",
    "check_triton_inputs",
    "interpreter_enabled",
    "rational_backward",
    "rational_forward",
    "rational_triton",
]
