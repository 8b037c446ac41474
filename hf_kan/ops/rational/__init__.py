"""The Group-Rational activation op.

``group_rational`` is the single entry point the modules call. It dispatches to
one of the backends below; every backend is tested against
:func:`~hf_kan.ops.rational.reference.rational_reference`.

Backend selection, first match wins: the ``backend`` argument (from a model
config), then the ``HF_KAN_RATIONAL_BACKEND`` environment variable, then
``"auto"``.
"""

from __future__ import annotations

import os

import torch

from ...errors import BackendUnavailableError
from .reference import DENOMINATOR_TERMS, NUMERATOR_TERMS, check_rational_shapes, rational_reference

BACKEND_ENV_VAR = "HF_KAN_RATIONAL_BACKEND"
BACKENDS = ("auto", "reference")


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """Return the concrete backend name for ``x`` given the requested one (``None`` reads the environment)."""
    name = backend or os.environ.get(BACKEND_ENV_VAR) or "auto"
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown rational backend {name!r} (from {'the config' if backend else BACKEND_ENV_VAR}); "
            f"choose one of {', '.join(BACKENDS)}"
        )
    return "reference" if name == "auto" else name


def group_rational(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """Apply F(x) = P(x) / Q(x) per channel group to ``x`` of shape ``[..., C]``; see ``reference``."""
    resolve_backend(backend, x)
    return rational_reference(x, numerator, denominator)


__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "DENOMINATOR_TERMS",
    "NUMERATOR_TERMS",
    "check_rational_shapes",
    "group_rational",
    "rational_reference",
    "resolve_backend",
]
