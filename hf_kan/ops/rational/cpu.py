r"""Fused CPU path of the Group-Rational activation.

A custom ``torch.autograd.Function`` whose forward and backward are each one hand-fused formulation (see
:mod:`hf_kan.ops.rational.triton` for the derivation of the backward): the forward saves only ``x``; the backward
recomputes ``P`` and ``Q`` and produces ``dL/dx`` and the ten per-group sums
``A_i = sum(gamma x^i / Q)`` and ``B_i = sum(gamma P |x|^i / Q^2)`` in a single pass, instead of the
two dozen separate kernels and saved intermediates of autograd through the reference.

For tensors of at least :data:`COMPILE_MIN_NUMEL` elements both formulations run through ``torch.compile``
(Inductor emits one vectorised C++ loop for each), compiled lazily on first use with dynamic shapes, so a new batch
size, sequence length or channel count never recompiles; only a new input dtype does. The first compilation of a
process logs one INFO line (``hf_kan.ops.rational.cpu``; the ``hf-kan`` CLI shows it). Inductor keeps the compiled
code in its disk cache (FX-graph and AOT-autograd caches, on by default), so later processes skip code generation
and the C++ compiler and pay only tracing, the cache lookup and Inductor's CPU probe (measured on a loaded 2-core
machine: about 65 s in a fresh environment, 15-25 s afterwards). Smaller tensors gain nothing from compiling
(``benchmarks/rational_cpu_threshold.py``: at 8,192 elements compiled and eager calls cost the same, from about
25,000 compiled wins) and take the eager path, autograd through the reference: it was faster than the eager fused
formulation (which recomputes instead of keeping intermediates) at 17 of the 18 shapes measured, within 4 % at the
other. ``HF_KAN_RATIONAL_CPU_COMPILE=0`` never compiles (e.g. without a C++ compiler; the eager path is then used
at every size), ``=1`` always does. Inside a ``torch.compile``'d model the reference is traced into the caller's
graph; ``compile=False`` runs the fused formulation eagerly (tests compare it with the reference).

Compute precision: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs (so ``gradcheck`` works); outputs in the
input dtype, coefficient gradients in the coefficients' dtype.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from .reference import NUMERATOR_TERMS, check_rational_shapes, rational_reference

COMPILE_ENV_VAR = "HF_KAN_RATIONAL_CPU_COMPILE"
# Measured with benchmarks/rational_cpu_threshold.py (one thread, forward + backward): compiled / best eager per call
# is 0.87-1.05 up to 8,192 elements and 1.23-1.51 at 24,576-32,768 (3.3x at 131,072).
COMPILE_MIN_NUMEL = 1 << 14

logger = logging.getLogger(__name__)  # stdlib logging: nothing under hf_kan.ops imports Transformers


def _fused_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F(x) for ``x`` ``[M, C]``; ``a`` ``[6, C]`` and ``b`` ``[4, C]`` (already ``|b|``) per channel, compute dtype."""
    xf = x.to(a.dtype)
    ax = xf.abs()
    p = ((((a[5] * xf + a[4]) * xf + a[3]) * xf + a[2]) * xf + a[1]) * xf + a[0]
    q = (((b[3] * ax + b[2]) * ax + b[1]) * ax + b[0]) * ax + 1.0
    return (p / q).to(x.dtype)


def _fused_backward(
    x: torch.Tensor, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_dx: bool, groups: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``dL/dx`` (``None`` unless ``need_dx``) and the per-group sums ``[10, G]`` (A_0..A_5, B_1..B_4; float64).

    The sums are taken first over the channels of a group within each row (contiguous memory: Inductor fuses it
    with the elementwise work into one row-major pass), then over rows ([rows, G] partials, 1/(C/G) of the input's
    size). Reducing straight over rows per channel made Inductor stride down columns and spill ``[M, C]``
    temporaries, 2-3x slower at KAT widths.
    """
    m, c = x.shape
    d = c // groups
    xf = x.to(a.dtype).view(m, groups, d)
    gf = grad_out.to(a.dtype).view(m, groups, d)
    a = a.view(a.shape[0], groups, d)
    b = b.view(b.shape[0], groups, d)
    ax = xf.abs()
    p = ((((a[5] * xf + a[4]) * xf + a[3]) * xf + a[2]) * xf + a[1]) * xf + a[0]
    q = (((b[3] * ax + b[2]) * ax + b[1]) * ax + b[0]) * ax + 1.0
    r = gf / q  # gamma / Q
    s = r * p / q  # gamma * P / Q^2
    dx = None
    if need_dx:
        dp = (((5.0 * a[5] * xf + 4.0 * a[4]) * xf + 3.0 * a[3]) * xf + 2.0 * a[2]) * xf + a[1]
        dq_abs = ((4.0 * b[3] * ax + 3.0 * b[2]) * ax + 2.0 * b[1]) * ax + b[0]
        dx = (r * dp - s * torch.sign(xf) * dq_abs).to(x.dtype).view(m, c)
    x2 = xf * xf
    x3 = x2 * xf
    x4 = x2 * x2
    terms = (r, r * xf, r * x2, r * x3, r * x4, r * x4 * xf, s * ax, s * x2, s * x3.abs(), s * x4)
    # rows are summed in float64: M terms of mixed sign, while the partials are only 1/(C/G) of the data
    return dx, torch.stack([t.sum(-1) for t in terms]).to(torch.float64).sum(1)


_compiled: dict[str, object] = {}
_compiled_dtypes: set[tuple[str, torch.dtype]] = set()  # (formulation, dtype) pairs already compiled here
_compile_failed = False
_compile_lock = threading.Lock()


def _announce_compile(name: str, dtype: torch.dtype) -> None:
    """Log the first compilation of this process (one INFO line), and how long each one took (DEBUG)."""
    if not _compiled_dtypes:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        logger.info(
            "compiling the fused CPU rational kernels (torch.compile, once per process and dtype): up to a minute "
            "the first time, much less once Inductor's disk cache (%s) holds them; %s=0 skips compiling",
            cache_dir(),
            COMPILE_ENV_VAR,
        )
    _compiled_dtypes.add((name, dtype))


def _compiled_fn(name: str):
    """``torch.compile`` of one formulation, created once per process (dynamic shapes, whole graph)."""
    with _compile_lock:
        if name not in _compiled:
            fn = _fused_forward if name == "forward" else _fused_backward
            _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
        return _compiled[name]


def _should_compile(x: torch.Tensor, compile: bool | None) -> bool:
    if torch.compiler.is_compiling():
        return False  # already inside the caller's graph
    if compile is not None:
        return compile
    setting = os.environ.get(COMPILE_ENV_VAR, "auto").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if _compile_failed:
        return False
    return setting in ("1", "true", "yes", "on") or x.numel() >= COMPILE_MIN_NUMEL


def _run(name: str, compile: bool, *args):
    """Run one formulation, compiled if asked; a failed compilation falls back to eager once, with a warning."""
    global _compile_failed
    fn = _fused_forward if name == "forward" else _fused_backward
    if not compile:
        return fn(*args)
    # detach(): a view's ``_base`` would otherwise be guarded on, recompiling for every new leading shape
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    key = (name, args[0].dtype)
    first = key not in _compiled_dtypes
    try:
        if first:
            _announce_compile(*key)
            start = time.perf_counter()
        result = _compiled_fn(name)(*args)
        if first:
            logger.debug("compiled the CPU rational %s for %s in %.1f s", name, key[1], time.perf_counter() - start)
        return result
    except Exception as err:  # Inductor needs a working C++ toolchain; everything else is the same math
        _compile_failed = True
        logger.warning(
            "torch.compile of the fused CPU rational failed (%s: %s); using the eager formulation from now on. "
            "Set %s=0 to skip the attempt.",
            type(err).__name__,
            err,
            COMPILE_ENV_VAR,
        )
        return fn(*args)


def _per_channel(numerator: torch.Tensor, denominator: torch.Tensor, channels: int, dtype: torch.dtype):
    """``a`` ``[6, C]`` and ``|b|`` ``[4, C]`` in the compute dtype (group g covers C/G contiguous channels)."""
    groups = denominator.shape[0]
    a = numerator.detach().to(dtype)
    a = a.expand(channels, NUMERATOR_TERMS) if a.shape[0] == 1 else a.repeat_interleave(channels // groups, dim=0)
    b = denominator.detach().to(dtype).abs().repeat_interleave(channels // groups, dim=0)
    return a.t().contiguous(), b.t().contiguous()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class RationalCPUFunction(torch.autograd.Function):
    """Autograd wrapper of the fused formulations; ``x`` is channels-last ``[M, C]`` (the dispatcher reshapes)."""

    @staticmethod
    def forward(ctx, x, numerator, denominator, compile):
        channels = x.shape[-1]
        check_rational_shapes(channels, numerator, denominator)
        a, b = _per_channel(numerator, denominator, channels, _compute_dtype(x))
        use_compile = _should_compile(x, compile)
        out = _run("forward", use_compile, x, a, b)
        ctx.save_for_backward(x, numerator, denominator, a, b)
        ctx.use_compile = use_compile
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, numerator, denominator, a, b = ctx.saved_tensors
        need_x, need_num, need_den = ctx.needs_input_grad[:3]
        groups = denominator.shape[0]
        dx, sums = _run("backward", ctx.use_compile, x, grad_out, a, b, bool(need_x), groups)
        grad_num = grad_den = None
        if need_num or need_den:
            per_group = sums.t()  # [G, 10]
            if need_num:
                grad_num = per_group[:, :NUMERATOR_TERMS]
                if numerator.shape[0] == 1:
                    grad_num = grad_num.sum(0, keepdim=True)
                grad_num = grad_num.to(numerator.dtype)
            if need_den:
                den = denominator.detach().to(per_group.dtype)
                grad_den = (-torch.sign(den) * per_group[:, NUMERATOR_TERMS:]).to(denominator.dtype)
        return dx, grad_num, grad_den, None


def rational_cpu(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    *,
    channel_dim: int = -1,
    compile: bool | None = None,
) -> torch.Tensor:
    """Differentiable Group-Rational activation through the fused CPU formulation.

    ``x``: channels-last ``[..., C]`` or, with ``channel_dim=1``, channels-first ``(N, C, *spatial)``.
    ``compile``: ``None`` decides per call: compiled at :data:`COMPILE_MIN_NUMEL` elements and above (unless
    ``HF_KAN_RATIONAL_CPU_COMPILE`` says otherwise), else autograd through the reference (the faster eager path);
    ``True`` forces compiling, ``False`` the eager fused formulation. Returns a tensor of ``x``'s shape and dtype.
    Works on any device (the formulation is plain PyTorch), but it is tuned for and dispatched on CPU.
    """
    if channel_dim % max(x.dim(), 1) != x.dim() - 1:
        if x.dim() < 3 or channel_dim % x.dim() != 1:
            raise ValueError(
                f"channel_dim must be -1 (channels last) or 1 for a channels-first (N, C, *spatial) tensor; "
                f"got channel_dim={channel_dim} for shape {tuple(x.shape)}"
            )
        return rational_cpu(x.movedim(1, -1), numerator, denominator, compile=compile).movedim(-1, 1)
    if compile is None and not _should_compile(x, compile):
        # Uncompiled, the recompute-based formulation makes more passes over memory than autograd through the
        # reference (which keeps its intermediates): the reference is the faster eager choice (17 of 18 shapes).
        return rational_reference(x, numerator, denominator)
    shape = x.shape
    out = RationalCPUFunction.apply(x.reshape(-1, shape[-1]), numerator, denominator, compile)
    return out.view(shape)


__all__ = ["COMPILE_ENV_VAR", "COMPILE_MIN_NUMEL", "RationalCPUFunction", "rational_cpu"]
