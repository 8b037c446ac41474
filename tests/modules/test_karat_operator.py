"""The Fourier-KArAt operator against a direct per-row float64 evaluation of the formula, and its gradients."""

from __future__ import annotations

import math

import pytest
import torch

from hf_kan.errors import HFKanConfigError, ImageSizeError
from hf_kan.modules.fourier_attention import FourierKArAtOperator, fourier_kan_rows, fourier_kan_rows_reference

# Odd, distinct sizes so that a swapped axis cannot go unnoticed.
B, H, N, G, R, D = 2, 3, 7, 3, 5, 4


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny ops: one intra-op thread is far faster than two on a shared, loaded 2-core machine (no barrier waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def direct_per_row(scores, coeffs, weight, value):
    """sigma_hat(A[k,:]) = W @ Phi(A[k,:]), Phi(x)_j = sum_i sum_m a cos(m x_i) + b sin(m x_i); out = sigma_hat @ V.

    Plain Python sums over one row at a time (float64), written straight from the paper's formula.
    """
    b_, h_, n, _ = scores.shape
    grid, rank = coeffs.shape[1], coeffs.shape[-1]
    sigma = torch.zeros(b_, h_, n, n, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            for k in range(n):
                row = scores[b, h, k].tolist()
                phi = [0.0] * rank
                for j in range(rank):
                    for i in range(n):
                        for m in range(1, grid + 1):
                            phi[j] += coeffs[0, m - 1, h, i, j].item() * math.cos(m * row[i])
                            phi[j] += coeffs[1, m - 1, h, i, j].item() * math.sin(m * row[i])
                for l_ in range(n):
                    sigma[b, h, k, l_] = sum(weight[h, l_, j].item() * phi[j] for j in range(rank))
    return sigma, sigma @ value.double()


@pytest.fixture
def operator_inputs():
    op = FourierKArAtOperator(H, N, grid_size=G, rank=R, dtype=torch.float64)
    # Scores of the size QK^T/sqrt(d) produces, spread over several periods of cos(3x).
    scores = 2.0 * torch.randn(B, H, N, N, dtype=torch.float64)
    value = torch.randn(B, H, N, D, dtype=torch.float64)
    return op, scores, value


@pytest.mark.parametrize("implementation", ["recompute", "reference"])
def test_operator_matches_direct_per_row_formula(operator_inputs, implementation):
    op, scores, value = operator_inputs
    op.implementation = implementation
    sigma_ref, out_ref = direct_per_row(scores, op.fourier_coeffs.detach(), op.low_rank_weight.detach(), value)
    with torch.no_grad():
        out, weights = op(scores, value, return_weights=True)
        out_lean, no_weights = op(scores, value)  # recompute: Phi @ (W^T V) without the N x N matrix
    assert no_weights is None
    assert rel_err(weights, sigma_ref) < 1e-12
    assert rel_err(out, out_ref) < 1e-12
    assert rel_err(out_lean, out_ref) < 1e-12

    # float32 parameters and inputs against the same float64 reference
    op32 = FourierKArAtOperator(H, N, grid_size=G, rank=R, implementation=implementation)
    op32.load_state_dict(op.state_dict())
    with torch.no_grad():
        out32, _ = op32(scores.float(), value.float())
    assert out32.dtype == torch.float32
    assert rel_err(out32, out_ref) < 1e-5


def test_recompute_gradients_match_reference_autograd(operator_inputs):
    op, scores, value = operator_inputs
    grad_out = torch.randn(B, H, N, D, dtype=torch.float64)
    grads = {}
    for implementation in ("recompute", "reference"):
        op.implementation = implementation
        op.zero_grad(set_to_none=True)
        s = scores.clone().requires_grad_(True)
        v = value.clone().requires_grad_(True)
        out, _ = op(s, v)
        out.backward(grad_out)
        grads[implementation] = [s.grad, v.grad, op.fourier_coeffs.grad, op.low_rank_weight.grad]
    for fast, ref in zip(grads["recompute"], grads["reference"]):
        assert fast is not None and ref is not None
        assert rel_err(fast, ref) < 1e-12


def test_fourier_kan_rows_gradcheck_float64():
    scores = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(2, 2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fourier_kan_rows, (scores, coeffs))
    assert torch.autograd.gradcheck(fourier_kan_rows_reference, (scores, coeffs))


def test_gradients_reach_every_coefficient(operator_inputs):
    op, scores, value = operator_inputs
    out, _ = op(scores.requires_grad_(True), value)
    out.square().sum().backward()
    # Every single cosine/sine coefficient and every entry of W receives a (non-zero) gradient.
    assert op.fourier_coeffs.grad.shape == (2, G, H, N, R)
    assert bool((op.fourier_coeffs.grad != 0).all())
    assert bool((op.low_rank_weight.grad != 0).all())
    assert bool((scores.grad != 0).all())


def test_initialisation_scales_are_variance_preserving():
    torch.manual_seed(1)
    n, heads, rank, grid = 65, 4, 12, 3
    op = FourierKArAtOperator(heads, n, grid_size=grid, rank=rank)
    assert op.init_stds() == pytest.approx((1 / math.sqrt(n * grid), 1 / math.sqrt(n * rank)))
    assert op.fourier_coeffs.std().item() == pytest.approx(1 / math.sqrt(n * grid), rel=0.05)
    scores = 3.0 * torch.randn(16, heads, n, n)  # the scale of the scores does not matter: cos^2 + sin^2 = 1
    value = torch.randn(16, heads, n, 8)
    with torch.no_grad():
        phi = op.phi(scores)
        out, _ = op(scores, value)
    assert phi.var().item() == pytest.approx(1.0, rel=0.25)
    assert out.var().item() == pytest.approx(1.0, rel=0.35)


def test_dropout_only_in_training_and_weights_on_request(operator_inputs):
    op, scores, value = operator_inputs
    op.eval()
    with torch.no_grad():
        ref, _ = op(scores, value)
        out, _ = op(scores, value, dropout=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    op.train()
    with torch.no_grad():
        dropped, weights = op(scores, value, dropout=0.5, return_weights=True)
    assert not torch.allclose(dropped, ref)
    torch.testing.assert_close(weights @ value, ref, rtol=1e-10, atol=1e-10)  # weights are returned before dropout


@pytest.mark.parametrize("implementation", ["recompute", "reference"])
def test_low_precision_is_evaluated_in_float32(implementation):
    op = FourierKArAtOperator(H, N, grid_size=G, rank=R, implementation=implementation)
    scores = 2.0 * torch.randn(B, H, N, N)
    value = torch.randn(B, H, N, D)
    with torch.no_grad():
        phi = op.phi(scores.bfloat16())
        assert phi.dtype == torch.float32
        assert rel_err(phi, op.phi(scores.bfloat16().float())) < 1e-6
        # a bfloat16 operator: coefficients rounded to bf16, but cos/sin and the sums still in float32
        ref, _ = op(scores, value)
        out, _ = op.to(torch.bfloat16)(scores.bfloat16(), value.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 3e-2


def test_wrong_token_count_raises_image_size_error(operator_inputs):
    op, _, _ = operator_inputs
    scores = torch.randn(1, H, N + 1, N + 1, dtype=torch.float64)
    with pytest.raises(ImageSizeError, match=f"N={N} tokens"):
        op(scores, torch.randn(1, H, N + 1, D, dtype=torch.float64))


def test_invalid_arguments_raise_config_errors():
    with pytest.raises(HFKanConfigError, match="grid_size"):
        FourierKArAtOperator(2, 5, grid_size=0)
    with pytest.raises(HFKanConfigError, match="implementation"):
        FourierKArAtOperator(2, 5, implementation="fast")
    op = FourierKArAtOperator(2, 5)
    with pytest.raises(HFKanConfigError, match="expects scores of shape"):
        op.phi(torch.randn(1, 3, 5, 5))
    assert FourierKArAtOperator.num_parameters_formula(2, 5, 3, 12) == sum(p.numel() for p in op.parameters())
