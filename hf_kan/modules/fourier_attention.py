"""Fourier-KArAt: the learnable Fourier-KAN attention operator of KArAt.

Paper: S. Maity, K. Hitsman, X. Li, A. Dutta, "Kolmogorov-Arnold Attention: Is Learnable Attention Better For
Vision Transformers?" (arXiv 2503.10632).

For one head with scores ``A = Q K^T / sqrt(d)`` (``N x N``), KArAt replaces the row-wise softmax by a learnable
low-rank operator applied to each row ``A[k, :]``::

    sigma_hat(A[k, :]) = W @ Phi(A[k, :])                              (W: N x r)
    Phi(x)_j = sum_{i=1..N} phi_ji(x_i)                                 (a KAN layer R^N -> R^r)
    phi_ji(x) = sum_{m=1..G} a[m, i, j] cos(m x) + b[m, i, j] sin(m x)  (Fourier basis, grid size G, no base function)

and the head output is ``sigma_hat(A) @ V``. Stacked over the rows, ``Phi(A)`` is the ``N x r`` matrix

    Phi(A) = sum_{m=1..G} cos(m A) @ a[m] + sin(m A) @ b[m]             (a[m], b[m]: N x r)

so the KAN layer is ``2G`` matrix products and never needs the ``[N, N, 2G]`` basis tensor. The attention matrix is
``sigma_hat(A) = Phi(A) @ W^T`` and the output is computed as ``Phi(A) @ (W^T @ V)``, which never forms the ``N x N``
attention matrix either (it is formed only when attention weights are requested or attention dropout is on).

One operator holds the coefficients of all ``H`` heads of one layer; blockwise sharing gives every layer its own
operator, universal sharing gives all layers the same one (that choice is made by the model that owns them).

Two implementations compute the same function:

- ``"recompute"`` (default): a custom autograd function that saves only ``A`` for the backward pass and recomputes
  ``cos(m A)`` / ``sin(m A)`` there, one frequency at a time.
- ``"reference"``: the formula written out with plain autograd (materialises the basis and the attention matrix);
  short, float64-capable, used by the tests and the memory benchmark as the naive baseline.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..errors import HFKanConfigError, ImageSizeError

OperatorImplementation = Literal["recompute", "reference"]
OPERATOR_IMPLEMENTATIONS: tuple[str, ...] = ("recompute", "reference")


def fourier_kan_rows_reference(scores: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Naive ``Phi(A)``: ``out[..., h, k, j] = sum_{m, i} a[m, h, i, j] cos(m A[..., h, k, i]) + b[...] sin(...)``.

    ``scores``: ``[B, H, N, N]``; ``coeffs``: ``[2, G, H, N, r]`` (index 0 = cosine ``a``, 1 = sine ``b``).
    Materialises the ``[B, H, N, N, G]`` basis twice; for tests and as the memory baseline only.
    """
    grid_size = coeffs.shape[1]
    freqs = torch.arange(1, grid_size + 1, device=scores.device, dtype=scores.dtype)
    angles = scores.unsqueeze(-1) * freqs  # [B, H, N, N, G]
    return torch.einsum("bhkim,mhij->bhkj", torch.cos(angles), coeffs[0]) + torch.einsum(
        "bhkim,mhij->bhkj", torch.sin(angles), coeffs[1]
    )


class _FourierKANRowsFunction(torch.autograd.Function):
    """``Phi(A)`` with a backward pass that recomputes the Fourier basis instead of storing it.

    Backward, with ``g = dL/dPhi`` (``[B, H, N, r]``) and ``c_m = cos(m A)``, ``s_m = sin(m A)``::

        dL/da[m] = sum_B c_m^T @ g          dL/db[m] = sum_B s_m^T @ g
        dL/dA    = sum_m m * ( c_m * (g @ b[m]^T) - s_m * (g @ a[m]^T) )
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        grid_size = coeffs.shape[1]
        ctx.save_for_backward(scores, coeffs)
        basis = torch.empty_like(scores)  # the only N x N temporary: one frequency and one of cos/sin at a time
        out = None
        for m in range(1, grid_size + 1):
            for part, fn in ((0, torch.Tensor.cos_), (1, torch.Tensor.sin_)):
                fn(torch.mul(scores, m, out=basis))
                term = torch.matmul(basis, coeffs[part, m - 1])  # [B, H, N, r]
                out = term if out is None else out.add_(term)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        scores, coeffs = ctx.saved_tensors
        grid_size = coeffs.shape[1]
        need_scores, need_coeffs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_out = grad_out.contiguous()
        grad_scores = torch.zeros_like(scores) if need_scores else None
        grad_coeffs = torch.empty_like(coeffs) if need_coeffs else None
        cos_m = torch.empty_like(scores)
        sin_m = torch.empty_like(scores)
        tmp = torch.empty_like(scores) if need_scores else None
        for m in range(1, grid_size + 1):
            torch.mul(scores, m, out=cos_m)
            torch.sin(cos_m, out=sin_m)
            cos_m.cos_()
            if need_coeffs:
                # sum over batch and query rows k of basis[k, i] * g[k, j]  -> [H, N, r]
                grad_coeffs[0, m - 1] = torch.matmul(cos_m.transpose(-1, -2), grad_out).sum(0)
                grad_coeffs[1, m - 1] = torch.matmul(sin_m.transpose(-1, -2), grad_out).sum(0)
            if need_scores:
                torch.matmul(grad_out, coeffs[1, m - 1].transpose(-1, -2), out=tmp)
                grad_scores.addcmul_(tmp, cos_m, value=m)
                torch.matmul(grad_out, coeffs[0, m - 1].transpose(-1, -2), out=tmp)
                grad_scores.addcmul_(tmp, sin_m, value=-m)
        return grad_scores, grad_coeffs


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of ``dtypes`` and float32: ``cos(m x)`` of half-precision scores loses most of its digits."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def fourier_kan_rows(scores: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``Phi(A)`` ``[B, H, N, r]`` of every row of ``scores`` ``[B, H, N, N]`` with ``coeffs`` ``[2, G, H, N, r]``.

    Same function as :func:`fourier_kan_rows_reference`; saves only ``scores`` for backward. Computed with autocast
    off in float32 or the wider input dtype (float64), and returned in that dtype.
    """
    dtype = _compute_dtype(scores.dtype, coeffs.dtype)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        return _FourierKANRowsFunction.apply(scores.to(dtype), coeffs.to(dtype))


class FourierKArAtOperator(nn.Module):
    """The learnable Fourier-KArAt operator of one attention layer (all heads), replacing the row-wise softmax.

    Parameters (per operator, i.e. per layer for blockwise sharing or once for universal sharing):
    ``fourier_coeffs`` ``[2, G, H, N, r]`` (cosine / sine coefficients of Phi) and ``low_rank_weight`` ``[H, N, r]``
    (``W``): ``H * N * r * (2G + 1)`` numbers.

    Initialisation (the paper draws N(0, 1) and scales "for stability"; these are the scales used here):

    - ``fourier_coeffs ~ N(0, 1) / sqrt(N * G)``. Since ``cos^2 + sin^2 = 1``, each output ``Phi(x)_j`` is a sum of
      ``N * G`` independent terms whose variance is exactly ``coeff_var`` whatever the scores ``x`` are, so
      ``Var(Phi_j) = 1`` at initialisation for any input scale.
    - ``low_rank_weight ~ N(0, 1) / sqrt(N * r)``: each attention entry has variance ``1 / N`` (a row has unit
      L2 norm on average) and ``sigma_hat(A) @ V`` keeps the variance of ``V``.

    Memory per layer (B batch, H heads, N tokens, head dim D, rank r, G frequencies; in elements of the compute
    dtype, which is float32 at least: half-precision scores and coefficients are evaluated in float32),
    ``"recompute"`` implementation:

    - saved for backward: the scores ``A`` (``B*H*N*N``), ``Phi(A)`` (``B*H*N*r``) and ``W^T V`` (``B*H*r*D``).
      That is the same order as softmax attention in eager mode, which saves its ``B*H*N*N`` probabilities.
    - temporaries: forward one ``B*H*N*N`` buffer; backward four (``dA``, ``cos(mA)``, ``sin(mA)``, one product).
    - for comparison, ``"reference"`` (plain autograd) keeps ``2G+1`` basis/angle tensors of ``B*H*N*N`` each plus
      the ``N x N`` attention matrix; with ``G = 3`` about 8x the saved activations of ``"recompute"``.
    - the operator is tied to ``N``: a model built for one image size cannot run at another.

    With attention weights requested (``return_weights``) or attention dropout active, the ``B*H*N*N`` matrix
    ``Phi(A) @ W^T`` is formed and the output is computed from it.
    """

    def __init__(
        self,
        num_heads: int,
        num_tokens: int,
        grid_size: int = 3,
        rank: int = 12,
        implementation: OperatorImplementation = "recompute",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_heads", num_heads), ("num_tokens", num_tokens), ("grid_size", grid_size),
                            ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise HFKanConfigError(f"FourierKArAtOperator: {name} must be a positive integer, got {value!r}.")
        if implementation not in OPERATOR_IMPLEMENTATIONS:
            raise HFKanConfigError(
                f"FourierKArAtOperator: implementation must be one of {OPERATOR_IMPLEMENTATIONS}, "
                f"got {implementation!r}."
            )
        self.num_heads = num_heads
        self.num_tokens = num_tokens
        self.grid_size = grid_size
        self.rank = rank
        self.implementation = implementation
        factory = {"device": device, "dtype": dtype}
        self.fourier_coeffs = nn.Parameter(torch.empty(2, grid_size, num_heads, num_tokens, rank, **factory))
        self.low_rank_weight = nn.Parameter(torch.empty(num_heads, num_tokens, rank, **factory))
        self.reset_parameters()

    @staticmethod
    def num_parameters_formula(num_heads: int, num_tokens: int, grid_size: int, rank: int) -> int:
        """Parameters of one operator: ``H * N * r * (2G + 1)``."""
        return num_heads * num_tokens * rank * (2 * grid_size + 1)

    def init_stds(self) -> tuple[float, float]:
        """Init standard deviations ``(1/sqrt(N G), 1/sqrt(N r))`` of ``fourier_coeffs`` and ``low_rank_weight``."""
        return 1.0 / math.sqrt(self.num_tokens * self.grid_size), 1.0 / math.sqrt(self.num_tokens * self.rank)

    def reset_parameters(self) -> None:
        """Draw ``N(0, 1)`` coefficients scaled by :meth:`init_stds` (see the class docstring for why)."""
        coeff_std, weight_std = self.init_stds()
        with torch.no_grad():
            self.fourier_coeffs.normal_(0.0, coeff_std)
            self.low_rank_weight.normal_(0.0, weight_std)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_tokens={self.num_tokens}, grid_size={self.grid_size}, "
            f"rank={self.rank}, implementation={self.implementation!r}"
        )

    def check_num_tokens(self, num_tokens: int) -> None:
        """Raise :class:`~hf_kan.errors.ImageSizeError` unless ``num_tokens`` is the ``N`` of this operator."""
        if num_tokens != self.num_tokens:
            raise ImageSizeError(
                f"the Fourier-KArAt operator was built for N={self.num_tokens} tokens but got {num_tokens}. Its "
                "parameters are indexed by token position, so the token count (image size / patch size) is fixed "
                "when the model is built: feed images of the configured size, or build a new model for this size."
            )

    def phi(self, scores: torch.Tensor) -> torch.Tensor:
        """``Phi(A)`` ``[B, H, N, r]`` of the scores ``A`` ``[B, H, N, N]`` (the KAN layer applied to every row)."""
        if scores.dim() != 4 or scores.shape[1] != self.num_heads or scores.shape[-1] != scores.shape[-2]:
            raise HFKanConfigError(
                f"FourierKArAtOperator expects scores of shape [batch, {self.num_heads}, N, N], "
                f"got {tuple(scores.shape)}."
            )
        self.check_num_tokens(scores.shape[-1])
        if self.implementation == "reference":
            dtype = _compute_dtype(scores.dtype, self.fourier_coeffs.dtype)
            with torch.autocast(device_type=scores.device.type, enabled=False):
                return fourier_kan_rows_reference(scores.to(dtype), self.fourier_coeffs.to(dtype))
        return fourier_kan_rows(scores, self.fourier_coeffs)

    def attention_weights(self, scores: torch.Tensor) -> torch.Tensor:
        """The learned attention matrix ``sigma_hat(A) = Phi(A) @ W^T`` ``[B, H, N, N]`` (row k: ``W Phi(A[k,:])``)."""
        phi = self.phi(scores)
        return torch.matmul(phi, self.low_rank_weight.to(phi.dtype).transpose(-1, -2))

    def forward(
        self,
        scores: torch.Tensor,
        value: torch.Tensor,
        dropout: float = 0.0,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output ``sigma_hat(A) @ V`` ``[B, H, N, D]`` for scores ``[B, H, N, N]``, values ``[B, H, N, D]``.

        Returns ``(output, weights)``; ``weights`` is ``sigma_hat(A)`` when ``return_weights`` is set, else ``None``.
        ``dropout`` (active only in training mode) is applied to the attention matrix, as in softmax attention.
        """
        use_dropout = dropout > 0.0 and self.training
        if return_weights or use_dropout or self.implementation == "reference":
            weights = self.attention_weights(scores)
            probs = nn.functional.dropout(weights, p=dropout, training=self.training) if use_dropout else weights
            out = torch.matmul(probs, value.to(probs.dtype))
            return out.to(value.dtype), (weights if return_weights else None)
        phi = self.phi(scores)
        # Phi @ (W^T @ V): r x D per head instead of the N x N attention matrix.
        projected_value = torch.matmul(self.low_rank_weight.to(phi.dtype).transpose(-1, -2), value.to(phi.dtype))
        return torch.matmul(phi, projected_value).to(value.dtype), None


__all__ = [
    "OPERATOR_IMPLEMENTATIONS",
    "FourierKArAtOperator",
    "fourier_kan_rows",
    "fourier_kan_rows_reference",
]
