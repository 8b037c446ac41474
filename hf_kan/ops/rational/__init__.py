"""The Group-Rational activation op and its backend dispatch.

``group_rational`` is the single entry point the modules call. Backends, each tested against
:func:`~hf_kan.ops.rational.reference.rational_reference`:

- ``"reference"``: pure PyTorch, autograd through the formula; any device and dtype (float64 included), works
  under ``torch.compile``.
- ``"cpu"``: the fused CPU path (:mod:`.cpu`): hand-fused forward/backward in a custom autograd function,
  ``torch.compile``'d for large tensors. CPU tensors only.
- ``"triton"``: the fused Triton kernels (:mod:`.triton`): CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` (Triton's interpreter; slow, for testing). fp32/fp16/bf16.
- ``"auto"``: ``"triton"`` for CUDA tensors (``"reference"`` for float64 or when Triton is not installed);
  ``"triton"`` for CPU tensors under ``TRITON_INTERPRET=1``, else ``"cpu"``; ``"reference"`` on other devices.

Selection: a concrete backend passed as ``backend`` (e.g. a model config's ``rational_backend``) wins; otherwise
(``None`` or ``"auto"``) the ``HF_KAN_RATIONAL_BACKEND`` environment variable, then ``"auto"``. A backend that is
named explicitly but cannot run on the given tensor raises :class:`~hf_kan.errors.BackendUnavailableError`; it is
never silently replaced. Triton is imported only when the Triton backend runs.
"""

from __future__ import annotations

import torch

from ...errors import BackendUnavailableError
from .._backends import interpreter_requested, triton_available
from .._backends import requested_backend as _requested_backend
from .reference import DENOMINATOR_TERMS, NUMERATOR_TERMS, check_rational_shapes, rational_reference

BACKEND_ENV_VAR = "HF_KAN_RATIONAL_BACKEND"
BACKENDS = ("auto", "reference", "cpu", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def requested_backend(backend: str | None = None) -> str:
    """The backend name asked for: ``backend`` unless ``None``/``"auto"``, else ``HF_KAN_RATIONAL_BACKEND``, else
    ``"auto"``."""
    return _requested_backend(backend, BACKEND_ENV_VAR, BACKENDS, "rational", "the backend argument / config")


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """Return the concrete backend (``"reference"``, ``"cpu"`` or ``"triton"``) that will run on ``x``.

    Raises :class:`BackendUnavailableError` when a backend requested explicitly cannot run on ``x``.
    """
    name = requested_backend(backend)
    triton_ok = x.dtype in _TRITON_DTYPES and triton_available()
    if name == "auto":
        if x.is_cuda:
            return "triton" if triton_ok else "reference"
        if x.device.type == "cpu":
            return "triton" if triton_ok and interpreter_requested() else "cpu"
        return "reference"
    if name == "cpu" and x.device.type != "cpu":
        raise BackendUnavailableError(
            f"rational backend 'cpu' runs on CPU tensors, got one on {x.device}; use 'auto', 'triton' (CUDA) or "
            "'reference'"
        )
    if name == "triton":
        if not triton_available():
            raise BackendUnavailableError(
                "rational backend 'triton' needs the triton package (Linux: pip install triton); "
                "use 'auto', 'cpu' or 'reference'"
            )
        from .triton import check_triton_inputs

        check_triton_inputs(x)
    return name


def group_rational(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    backend: str | None = None,
    *,
    channel_dim: int = -1,
    deterministic: bool | None = None,
) -> torch.Tensor:
    r"""Apply F(x) = P(x) / Q(x) per channel group, P of degree 5, Q = 1 + sum_i |b_i| |x|^i (i = 1..4).

    ``x``: channels-last ``[..., C]`` (``channel_dim=-1``) or channels-first ``(N, C, *spatial)``
    (``channel_dim=1``). ``numerator``: ``[1, 6]`` (shared) or ``[G, 6]``; ``denominator``: ``[G, 4]``; group g
    covers channels ``g*C/G .. (g+1)*C/G - 1``. ``backend``: see the module docstring. ``deterministic``: for the
    Triton backward, sum coefficient partials in a fixed order instead of atomics (``None`` follows
    ``torch.are_deterministic_algorithms_enabled()``). Returns a tensor of ``x``'s shape and dtype.
    """
    name = resolve_backend(backend, x)
    if name == "triton":
        from .triton import rational_triton

        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        return rational_triton(x, numerator, denominator, channel_dim=channel_dim, deterministic=deterministic)
    if name == "cpu":
        from .cpu import rational_cpu

        return rational_cpu(x, numerator, denominator, channel_dim=channel_dim)
    if channel_dim % max(x.dim(), 1) == x.dim() - 1:
        return rational_reference(x, numerator, denominator)
    if x.dim() < 3 or channel_dim % x.dim() != 1:
        raise ValueError(
            f"channel_dim must be -1 (channels last) or 1 for a channels-first (N, C, *spatial) tensor; "
            f"got channel_dim={channel_dim} for shape {tuple(x.shape)}"
        )
    return rational_reference(x.movedim(1, -1), numerator, denominator).movedim(-1, 1)


__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "DENOMINATOR_TERMS",
    "NUMERATOR_TERMS",
    "check_rational_shapes",
    "group_rational",
    "rational_reference",
    "requested_backend",
    "resolve_backend",
    "triton_available",
]
