r"""Pure-PyTorch reference of the Group-Rational (GR-KAN) activation.

For a channel ``c`` in group ``g = c // (C / G)``:

.. math::

    F(x) = \frac{P(x)}{Q(x)}, \qquad
    P(x) = \sum_{i=0}^{5} a_{g,i} x^i, \qquad
    Q(x) = 1 + \sum_{i=1}^{4} |b_{g,i}|\,|x|^i .

This is the "safe" per-term form used by the KAT authors' kernels: ``Q >= 1``
everywhere, so there is never a division by zero. The numerator is either shared
by every group (shape ``[1, 6]``, the layout of the released checkpoints) or per
group (``[G, 6]``); the denominator is always per group (``[G, 4]``).

This module is the one definition every fast path is tested against. It is
autograd-differentiable, works in float64, and computes fp16/bf16 inputs in
fp32 before casting back.
"""

from __future__ import annotations

import torch

NUMERATOR_TERMS = 6
DENOMINATOR_TERMS = 4


def check_rational_shapes(channels: int, numerator: torch.Tensor, denominator: torch.Tensor) -> int:
    """Validate coefficient shapes against ``channels`` and return the group count G."""
    if denominator.dim() != 2 or denominator.shape[1] != DENOMINATOR_TERMS:
        raise ValueError(f"denominator must have shape [G, {DENOMINATOR_TERMS}], got {tuple(denominator.shape)}")
    groups = denominator.shape[0]
    if numerator.dim() != 2 or numerator.shape[1] != NUMERATOR_TERMS or numerator.shape[0] not in (1, groups):
        raise ValueError(
            f"numerator must have shape [1, {NUMERATOR_TERMS}] (shared) or [{groups}, {NUMERATOR_TERMS}] "
            f"(per group), got {tuple(numerator.shape)}"
        )
    if channels % groups:
        raise ValueError(f"channel count {channels} is not divisible by the group count {groups}")
    return groups


def _per_channel(coeffs: torch.Tensor, channels: int) -> torch.Tensor:
    """Expand ``[G or 1, K]`` group coefficients to ``[C, K]`` (group g covers C/G contiguous channels)."""
    return coeffs.repeat_interleave(channels // coeffs.shape[0], dim=0) if coeffs.shape[0] > 1 else coeffs


def rational_reference(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Evaluate the Group-Rational function on ``x`` of shape ``[..., C]`` (channels last).

    ``numerator``: ``[1, 6]`` or ``[G, 6]`` coefficients a_0..a_5; ``denominator``: ``[G, 4]``
    coefficients b_1..b_4. Returns a tensor of ``x``'s shape and dtype.
    """
    channels = x.shape[-1]
    check_rational_shapes(channels, numerator, denominator)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute_dtype)
    a = _per_channel(numerator.to(compute_dtype), channels)  # [C or 1, 6]
    b = _per_channel(denominator.to(compute_dtype), channels).abs()  # [C, 4]

    # Horner in x for P and in |x| for Q.
    p = a[:, 5]
    for i in range(4, -1, -1):
        p = a[:, i] + xc * p
    ax = xc.abs()
    q = b[:, 3]
    for i in range(2, -1, -1):
        q = b[:, i] + ax * q
    q = 1.0 + ax * q
    return (p / q).to(x.dtype)


__all__ = ["DENOMINATOR_TERMS", "NUMERATOR_TERMS", "check_rational_shapes", "rational_reference"]
