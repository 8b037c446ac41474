import pytest
import torch

from hf_kan.ops.rational import group_rational, rational_reference


def _direct(x, num, den):
    """Element-by-element evaluation of the formula in float64, written independently of the reference."""
    x = x.double()
    c = x.shape[-1]
    g = den.shape[0]
    out = torch.empty_like(x)
    flat = x.reshape(-1, c)
    res = out.view(-1, c)
    for ch in range(c):
        grp = ch // (c // g)
        a = num[0 if num.shape[0] == 1 else grp].double()
        b = den[grp].double()
        v = flat[:, ch]
        p = sum(a[i] * v**i for i in range(6))
        q = 1 + sum(b[i - 1].abs() * v.abs() ** i for i in range(1, 5))
        res[:, ch] = p / q
    return out


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("groups,channels", [(8, 24), (4, 12), (1, 5)])
def test_reference_matches_direct_formula(shared, groups, channels):
    x = torch.randn(3, 7, channels, dtype=torch.float64) * 2
    num = torch.randn(1 if shared else groups, 6, dtype=torch.float64)
    den = torch.randn(groups, 4, dtype=torch.float64)
    torch.testing.assert_close(rational_reference(x, num, den), _direct(x, num, den), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(group_rational(x, num, den), _direct(x, num, den), rtol=1e-12, atol=1e-12)


def test_reference_gradcheck_float64():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    num = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    den = (torch.rand(2, 4, dtype=torch.float64) + 0.1).requires_grad_(True)  # keep |b| away from the kink at 0
    assert torch.autograd.gradcheck(rational_reference, (x, num, den))


def test_reference_rejects_bad_shapes():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="divisible"):
        rational_reference(x, torch.randn(1, 6), torch.randn(4, 4))
    with pytest.raises(ValueError, match="numerator"):
        rational_reference(torch.randn(2, 8), torch.randn(3, 6), torch.randn(4, 4))
