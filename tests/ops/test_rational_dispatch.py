"""Backend selection of ``group_rational`` and the reference under ``torch.compile``."""

import pytest
import torch

import hf_kan.ops.rational as rational
from hf_kan.errors import BackendUnavailableError
from hf_kan.ops.rational import BACKEND_ENV_VAR, group_rational, rational_reference, resolve_backend


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_auto_rule_on_cpu(monkeypatch):
    x = torch.randn(2, 8)
    assert resolve_backend(None, x) == "cpu"
    assert resolve_backend("auto", x) == "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = "triton" if rational.triton_available() else "cpu"
    assert resolve_backend("auto", x) == expected
    assert resolve_backend("auto", x.double()) == "cpu"  # the kernels are fp32/fp16/bf16 only
    assert resolve_backend("auto", torch.empty(2, 8, device="meta")) == "reference"


def test_environment_overrides_auto_but_not_an_explicit_backend(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    assert resolve_backend(None, x) == "reference"
    assert resolve_backend("auto", x) == "reference"
    assert resolve_backend("cpu", x) == "cpu"
    monkeypatch.setenv(BACKEND_ENV_VAR, "bogus")
    with pytest.raises(BackendUnavailableError, match=BACKEND_ENV_VAR):
        resolve_backend(None, x)


def test_explicit_backend_that_cannot_run_is_refused(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="choose one of"):
        resolve_backend("fast", torch.randn(2, 8))
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        resolve_backend("cpu", torch.empty(2, 8, device="meta"))
    monkeypatch.setattr(rational, "triton_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="pip install triton"):
        resolve_backend("triton", torch.randn(2, 8))
    assert resolve_backend("auto", torch.randn(2, 8)) == "cpu"


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
def test_every_cpu_backend_agrees_with_float64(backend):
    x = torch.randn(3, 5, 24)
    num, den = torch.randn(8, 6), torch.randn(8, 4)
    ref = rational_reference(x.double(), num.double(), den.double())
    out = group_rational(x, num, den, backend=backend)
    assert out.dtype == x.dtype and ((out.double() - ref).norm() / ref.norm()) < 2e-6


def test_channels_first_and_bad_channel_dim_through_the_dispatcher():
    x = torch.randn(2, 6, 3, 5)
    num, den = torch.randn(1, 6), torch.randn(3, 4)
    expected = rational_reference(x.movedim(1, -1), num, den).movedim(-1, 1)
    for backend in ("reference", "cpu"):
        torch.testing.assert_close(group_rational(x, num, den, backend=backend, channel_dim=1), expected)
        with pytest.raises(ValueError, match="channel_dim"):
            group_rational(x, num, den, backend=backend, channel_dim=2)


@pytest.mark.slow
def test_compiled_reference_and_dispatch_match_eager():
    """``torch.compile`` of the reference (and of the default CPU dispatch inside a compiled function) == eager."""
    x = torch.randn(4, 7, 24, dtype=torch.float32)
    num, den = torch.randn(1, 6), torch.randn(8, 4)
    grad_out = torch.randn_like(x)

    def run(fn):
        xk, nk, dk = (t.clone().requires_grad_(True) for t in (x, num, den))
        out = fn(xk, nk, dk)
        out.backward(grad_out)
        return out.detach(), xk.grad, nk.grad, dk.grad

    eager = run(rational_reference)
    for fn in (rational_reference, lambda a, b, c: group_rational(a, b, c, backend="cpu")):
        compiled = run(torch.compile(fn, fullgraph=True))
        for got, want in zip(compiled, eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
