"""GroupRational (GR-KAN activation) and its presets: formula, gradients, presets, extreme inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_kan.errors import HFKanConfigError
from hf_kan.modules.group_rational import GroupRational
from hf_kan.modules.rational_presets import (
    PRESETS,
    SLOPE_BOUNDS,
    TARGET_FUNCTIONS,
    fit_grid,
    fit_rational,
    get_rational_preset,
    rational_eval,
    variance_preserving_gain_sq,
)
from hf_kan.ops.rational import group_rational


def direct_formula(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """F(x) channel by channel, written from the definition (float64, no Horner, no broadcasting tricks)."""
    x = x.double()
    channels = x.shape[-1]
    groups = den.shape[0]
    out = torch.empty_like(x)
    for c in range(channels):
        g = c // (channels // groups)
        a = num[g if num.shape[0] > 1 else 0].double()
        b = den[g].double()
        xc = x[..., c]
        p = sum(a[i] * xc**i for i in range(6))
        q = 1 + sum(b[i - 1].abs() * xc.abs() ** i for i in range(1, 5))
        out[..., c] = p / q
    return out


def random_module(channels: int, groups: int, shared: bool, dtype=torch.float64) -> GroupRational:
    mod = GroupRational(channels, groups, init="swish", shared_numerator=shared, backend="reference", dtype=dtype)
    with torch.no_grad():
        mod.weight_numerator.copy_(torch.randn_like(mod.weight_numerator) * 0.5)
        # signed denominators on purpose: the per-term |b_i| form must ignore the sign
        mod.weight_denominator.copy_(torch.randn_like(mod.weight_denominator))
    return mod


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (2, 3, 5, 24), (24,)])
def test_matches_direct_float64_formula(shared, shape):
    mod = random_module(24, 4, shared)
    x = torch.randn(*shape, dtype=torch.float64) * 2
    out = mod(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    ref = direct_formula(x, mod.weight_numerator, mod.weight_denominator)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck_float64(shared):
    mod = random_module(12, 3, shared)
    x = (torch.randn(4, 12, dtype=torch.float64) * 1.5).requires_grad_(True)

    def fn(x, num, den):
        return group_rational(x, num, den, backend="reference")

    num = mod.weight_numerator.detach().clone().requires_grad_(True)
    den = mod.weight_denominator.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, num, den), eps=1e-6, atol=1e-7)


def test_module_gradients_match_formula_derivatives():
    """Autograd through the module equals the closed-form dF/dx, dF/da, dF/db of methods.md."""
    mod = random_module(8, 2, shared=False)
    x = torch.randn(5, 8, dtype=torch.float64).requires_grad_(True)
    mod(x).sum().backward()
    a = mod.weight_numerator.detach()
    b = mod.weight_denominator.detach()
    xd = x.detach()
    gx = torch.empty_like(xd)
    ga = torch.zeros_like(a)
    gb = torch.zeros_like(b)
    for c in range(8):
        g = c // 4
        xc = xd[:, c]
        p = sum(a[g, i] * xc**i for i in range(6))
        dp = sum(i * a[g, i] * xc ** (i - 1) for i in range(1, 6))
        q = 1 + sum(b[g, i - 1].abs() * xc.abs() ** i for i in range(1, 5))
        dq = torch.sign(xc) * sum(i * b[g, i - 1].abs() * xc.abs() ** (i - 1) for i in range(1, 5))
        gx[:, c] = dp / q - p * dq / q**2
        for i in range(6):
            ga[g, i] += (xc**i / q).sum()
        for i in range(1, 5):
            gb[g, i - 1] += (-p / q**2 * torch.sign(b[g, i - 1]) * xc.abs() ** i).sum()
    torch.testing.assert_close(x.grad, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mod.weight_numerator.grad, ga, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mod.weight_denominator.grad, gb, rtol=1e-10, atol=1e-12)


def test_groups_are_contiguous_channel_blocks():
    mod = GroupRational(12, 4, shared_numerator=False, backend="reference", dtype=torch.float64)
    with torch.no_grad():
        mod.weight_numerator.zero_()
        mod.weight_numerator[:, 0] = torch.arange(4, dtype=torch.float64)  # F_g(x) = g
        mod.weight_denominator.zero_()
    out = mod(torch.randn(3, 12, dtype=torch.float64))
    expected = (torch.arange(12) // 3).double().expand(3, 12)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_targets_within_shipped_error(name):
    preset = get_rational_preset(name)
    x = fit_grid()
    mod = GroupRational(8, 2, init=name, backend="reference", dtype=torch.float64)
    y = mod(x.unsqueeze(-1).expand(-1, 8).contiguous())[:, 0]
    err = (y - TARGET_FUNCTIONS[name](x)).abs().max().item()
    assert err <= preset.max_abs_error * (1 + 1e-9) + 1e-12
    # off the fit grid (random points in [-3, 3]) the error stays at the shipped level
    xr = torch.empty(20000, dtype=torch.float64).uniform_(-3, 3)
    num = torch.tensor(preset.numerator, dtype=torch.float64)
    den = torch.tensor(preset.denominator, dtype=torch.float64)
    err_r = (rational_eval(xr, num, den) - TARGET_FUNCTIONS[name](xr)).abs().max().item()
    assert err_r <= preset.max_abs_error * 1.01 + 1e-9


def test_preset_errors_are_small_and_gelu_is_gelu_at_3():
    assert PRESETS["identity"].max_abs_error == 0.0
    for name, bound in {"swish": 2e-6, "gelu": 3e-3, "tanh": 1e-4, "sigmoid": 1e-6, "relu": 0.035}.items():
        assert PRESETS[name].max_abs_error < bound, name
    gelu = PRESETS["gelu"]
    f3 = rational_eval(torch.tensor(3.0, dtype=torch.float64), torch.tensor(gelu.numerator, dtype=torch.float64),
                       torch.tensor(gelu.denominator, dtype=torch.float64))
    assert abs(f3.item() - F.gelu(torch.tensor(3.0, dtype=torch.float64)).item()) < 1e-2  # published preset: 1.53


@pytest.mark.parametrize("name", ["swish", "tanh"])
def test_fit_rational_reproduces_shipped_presets(name):
    """The shipped numbers come from fit_rational: a refit on a coarser grid lands on the same function."""
    num, den, err = fit_rational(TARGET_FUNCTIONS[name], SLOPE_BOUNDS[name], points=1001)
    preset = PRESETS[name]
    assert err <= 2 * preset.max_abs_error
    x = fit_grid()
    shipped = rational_eval(x, torch.tensor(preset.numerator, dtype=torch.float64),
                            torch.tensor(preset.denominator, dtype=torch.float64))
    assert (rational_eval(x, num, den) - shipped).abs().max() <= 4 * preset.max_abs_error


def test_variance_preserving_gains():
    assert PRESETS["identity"].gain_sq == pytest.approx(1.0, abs=1e-12)
    assert PRESETS["swish"].gain_sq == pytest.approx(2.81, abs=0.01)  # methods.md: about 2.81
    assert PRESETS["gelu"].gain_sq == pytest.approx(2.35, abs=0.015)  # methods.md: about 2.35
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500_000, dtype=torch.float64, generator=gen)
    for name in ("swish", "gelu", "relu"):
        p = PRESETS[name]
        num = torch.tensor(p.numerator, dtype=torch.float64)
        den = torch.tensor(p.denominator, dtype=torch.float64)
        mc = 1.0 / rational_eval(x, num, den).pow(2).mean().item()
        assert mc == pytest.approx(p.gain_sq, rel=1e-2), name
        assert variance_preserving_gain_sq(num, den) == pytest.approx(p.gain_sq, rel=1e-9)
        assert GroupRational(8, init=name).gain == pytest.approx(math.sqrt(p.gain_sq))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_q_at_least_one_and_finite_for_extreme_inputs(dtype):
    x = torch.cat([torch.logspace(-4, 4, 41), -torch.logspace(-4, 4, 41), torch.tensor([0.0, 1e4, -1e4])])
    x = x.unsqueeze(-1).expand(-1, 16).contiguous().to(dtype)
    # numerator == 1 makes F = 1 / Q, so Q >= 1 <=> 0 <= F <= 1
    mod = GroupRational(16, 4, shared_numerator=True, backend="reference")
    with torch.no_grad():
        mod.weight_numerator.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0]]))
        mod.weight_denominator.copy_(torch.randn(4, 4) * 3)  # signed, as after training
    inv_q = mod(x).float()
    assert torch.isfinite(inv_q).all()
    assert (inv_q <= 1).all() and (inv_q >= 0).all()
    if dtype == torch.float32:
        assert (inv_q > 0).all()
    for name in ("swish", "gelu", "identity", "relu"):
        mod = GroupRational(16, 4, init=name, backend="reference")
        xr = x.detach().clone().requires_grad_(True)
        y = mod(xr)
        assert y.dtype == dtype and torch.isfinite(y.float()).all(), name
        y.float().sum().backward()
        assert torch.isfinite(xr.grad.float()).all(), name
        assert torch.isfinite(mod.weight_numerator.grad).all() and torch.isfinite(mod.weight_denominator.grad).all()


def test_module_api_shapes_reset_and_factory_kwargs():
    shared = GroupRational(32, 8, init="gelu")
    per_group = GroupRational(32, 8, init="gelu", shared_numerator=False, dtype=torch.float64)
    assert shared.weight_numerator.shape == (1, 6) and shared.weight_denominator.shape == (8, 4)
    assert per_group.weight_numerator.shape == (8, 6) and per_group.weight_numerator.dtype == torch.float64
    gelu = PRESETS["gelu"]
    torch.testing.assert_close(per_group.weight_numerator, torch.tensor(gelu.numerator).double().expand(8, 6))
    torch.testing.assert_close(per_group.weight_denominator, torch.tensor(gelu.denominator).double().expand(8, 4))
    with torch.no_grad():
        shared.weight_numerator.mul_(3)
    shared.reset_parameters()
    torch.testing.assert_close(shared.weight_numerator, torch.tensor([gelu.numerator]))
    meta = GroupRational(32, 8, device="meta")
    assert meta.weight_numerator.is_meta
    text = repr(shared)
    assert "groups=8" in text and "'gelu'" in text and "shared" in text


def test_coefficients_are_fp32_unless_a_dtype_is_given():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what from_config(..., dtype=torch.bfloat16) does while building
    try:
        module = GroupRational(16, 4, init="swish", backend="reference")
        explicit = GroupRational(16, 4, dtype=torch.float16)
    finally:
        torch.set_default_dtype(default)
    assert module.weight_numerator.dtype == module.weight_denominator.dtype == torch.float32
    assert explicit.weight_numerator.dtype == torch.float16
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = module(x)  # bf16 activations with fp32 coefficients: bf16 out, same as computing in fp32 and rounding
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, module(x.float()).to(torch.bfloat16), rtol=0, atol=0)


def test_module_errors():
    with pytest.raises(HFKanConfigError, match="divide"):
        GroupRational(30, 8)
    with pytest.raises(HFKanConfigError, match="unknown rational preset"):
        GroupRational(32, 8, init="softplus-ish")
    with pytest.raises(ValueError, match="channels last"):
        GroupRational(32, 8)(torch.randn(2, 16))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_extrapolate_at_most_linearly(name):
    """F(x) / x tends to a slope inside the preset's bounds, so no preset blows up outside the fit range."""
    p = PRESETS[name]
    x = torch.tensor([1e8, -1e8], dtype=torch.float64)
    ratio = rational_eval(x, torch.tensor(p.numerator, dtype=torch.float64),
                          torch.tensor(p.denominator, dtype=torch.float64)) / x
    lo, hi = SLOPE_BOUNDS[name]
    assert ((ratio >= lo - 1e-6) & (ratio <= hi + 1e-6)).all(), ratio
