"""The Group-Rational activation op.

``group_rational`` is the single entry point the modules call; it evaluates
:func:`~hf_kan.ops.rational.reference.rational_reference`.
"""

from __future__ import annotations

import torch

from .reference import DENOMINATOR_TERMS, NUMERATOR_TERMS, check_rational_shapes, rational_reference


def group_rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Apply F(x) = P(x) / Q(x) per channel group to ``x`` of shape ``[..., C]``; see ``reference``."""
    return rational_reference(x, numerator, denominator)


__all__ = [
    "DENOMINATOR_TERMS",
    "NUMERATOR_TERMS",
    "check_rational_shapes",
    "group_rational",
    "rational_reference",
]
