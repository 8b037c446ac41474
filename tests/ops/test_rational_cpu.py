"""The fused CPU rational path against the float64 reference (eager formulation always, compiled one marked slow)."""

import logging

import pytest
import torch

from hf_kan.ops.rational import cpu as rc
from hf_kan.ops.rational import group_rational, rational_reference


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def _reference_float64(x, num, den, grad_out, channel_dim=-1):
    xd, nd, dd = (t.detach().double().requires_grad_(True) for t in (x, num, den))
    out = rational_reference(xd.movedim(1, -1) if channel_dim == 1 else xd, nd, dd)
    out = out.movedim(-1, 1) if channel_dim == 1 else out
    out.backward(grad_out.double())
    return out.detach(), xd.grad, nd.grad, dd.grad


def _run_cpu(x, num, den, grad_out, **kwargs):
    xk, nk, dk = (t.detach().clone().requires_grad_(True) for t in (x, num, den))
    out = rc.rational_cpu(xk, nk, dk, **kwargs)
    out.backward(grad_out)
    return out.detach(), xk.grad, nk.grad, dk.grad


def _check(got, ref, tol):
    for name, g, r in zip(("output", "grad_x", "grad_numerator", "grad_denominator"), got, ref):
        assert g.shape == r.shape, name
        assert _rel(g, r) < tol, f"{name}: relative error {_rel(g, r):.2e}"


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape,groups", [((3, 37, 24), 8), ((301, 21), 3), ((77, 5), 1)])
def test_eager_fp32_matches_float64_reference(shape, groups, shared):
    x = torch.randn(shape) * 1.5
    num, den = torch.randn(1 if shared else groups, 6), torch.randn(groups, 4)
    grad_out = torch.randn(shape)
    _check(_run_cpu(x, num, den, grad_out, compile=False), _reference_float64(x, num, den, grad_out), tol=2e-6)


def test_eager_non_contiguous_and_channels_first():
    num, den = torch.randn(4, 6), torch.randn(4, 4)
    x = torch.randn(5, 72, 9).transpose(1, 2)[..., ::2]  # [5, 9, 36], non-contiguous
    grad_out = torch.randn(1, 9, 36).expand(5, 9, 36)
    _check(_run_cpu(x, num, den, grad_out, compile=False), _reference_float64(x, num, den, grad_out), tol=2e-6)

    y = torch.randn(2, 12, 5, 7)  # (N, C, H, W)
    grad_y = torch.randn_like(y)
    got = _run_cpu(y, num, den, grad_y, compile=False, channel_dim=1)
    _check(got, _reference_float64(y, num, den, grad_y, channel_dim=1), tol=2e-6)


def test_eager_bf16_and_only_requested_gradients():
    x = (torch.randn(33, 16) * 1.5).to(torch.bfloat16)
    num, den = torch.randn(1, 6), torch.randn(2, 4)
    grad_out = torch.randn(33, 16).to(torch.bfloat16)
    got = _run_cpu(x, num, den, grad_out, compile=False)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    _check(got, _reference_float64(x, num, den, grad_out), tol=1e-2)

    nk = num.clone().requires_grad_(True)
    rc.rational_cpu(x, nk, den, compile=False).float().sum().backward()
    ref = _reference_float64(x, num, den, torch.ones(33, 16))
    assert _rel(nk.grad, ref[2]) < 1e-5


def test_gradcheck_float64():
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    num = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    den = (torch.rand(2, 4, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: rc.rational_cpu(*a, compile=False), (x, num, den))


def test_compile_decision(monkeypatch):
    small, large = torch.randn(4, 8), torch.empty(rc.COMPILE_MIN_NUMEL // 64, 64)
    monkeypatch.delenv(rc.COMPILE_ENV_VAR, raising=False)
    assert not rc._should_compile(small, None) and rc._should_compile(large, None)
    assert rc._should_compile(small, True) and not rc._should_compile(large, False)
    monkeypatch.setenv(rc.COMPILE_ENV_VAR, "0")
    assert not rc._should_compile(large, None)
    monkeypatch.setenv(rc.COMPILE_ENV_VAR, "1")
    assert rc._should_compile(small, None)


def test_failed_compilation_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    def broken(name):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(rc, "_compiled_fn", broken)
    monkeypatch.setattr(rc, "_compile_failed", False)
    x, num, den = torch.randn(7, 12), torch.randn(3, 6), torch.randn(3, 4)
    grad_out = torch.randn(7, 12)
    with caplog.at_level(logging.WARNING, logger=rc.__name__):
        got = _run_cpu(x, num, den, grad_out, compile=True)
    assert "no C++ compiler" in caplog.text
    assert rc._compile_failed
    _check(got, _reference_float64(x, num, den, grad_out), tol=2e-6)


@pytest.mark.slow
def test_compiled_matches_reference_and_never_recompiles_for_new_shapes():
    from torch._dynamo.utils import counters

    num, den = torch.randn(1, 6), torch.randn(8, 4)
    x = torch.randn(2053, 64) * 1.5  # enough rows that the per-channel sums are long
    grad_out = torch.randn_like(x)
    _check(_run_cpu(x, num, den, grad_out, compile=True), _reference_float64(x, num, den, grad_out), tol=2e-6)
    graphs = counters["stats"]["unique_graphs"]
    for shape in ((5, 17, 40), (301, 200)):  # new row and channel counts: same graphs
        y, grad_y = torch.randn(shape), torch.randn(shape)
        num_g = torch.randn(8, 6)
        _check(_run_cpu(y, num_g, den, grad_y, compile=True), _reference_float64(y, num_g, den, grad_y), tol=2e-6)
    assert counters["stats"]["unique_graphs"] == graphs

    xb = x[:300].to(torch.bfloat16)
    grad_b = grad_out[:300].to(torch.bfloat16)
    _check(_run_cpu(xb, num, den, grad_b, compile=True), _reference_float64(xb, num, den, grad_b), tol=1e-2)


def _spy_on_fused(monkeypatch) -> list:
    """Record (rows x channels, compiled?) of every call of the fused function; compiled calls run eagerly here."""
    calls = []
    original = rc.RationalCPUFunction.forward

    def spy(ctx, *args):
        out = original(ctx, *args)
        calls.append((args[0].shape, ctx.use_compile))
        return out

    monkeypatch.setattr(rc.RationalCPUFunction, "forward", staticmethod(spy))
    monkeypatch.setattr(rc, "_compiled_fn", lambda name: rc._fused_forward if name == "forward" else rc._fused_backward)
    return calls


def test_auto_dispatch_on_cpu_compiles_large_tensors_only(monkeypatch):
    monkeypatch.delenv("HF_KAN_RATIONAL_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(rc.COMPILE_ENV_VAR, raising=False)
    calls = _spy_on_fused(monkeypatch)
    num, den = torch.randn(1, 6), torch.randn(4, 4)
    small = torch.randn(3, 4, 16)
    torch.testing.assert_close(group_rational(small, num, den, backend="auto"), rational_reference(small, num, den))
    assert calls == []  # below COMPILE_MIN_NUMEL: autograd through the reference, the faster eager choice
    large = torch.randn(rc.COMPILE_MIN_NUMEL // 16, 16, requires_grad=True)
    out = group_rational(large, num, den, backend="auto")
    assert calls == [(torch.Size([rc.COMPILE_MIN_NUMEL // 16, 16]), True)] and out.shape == large.shape


def test_uncompiled_inputs_use_the_reference_unless_fused_eager_is_asked_for(monkeypatch):
    """Without compilation the reference's autograd is the faster eager choice: it is used at every size."""
    monkeypatch.setenv(rc.COMPILE_ENV_VAR, "0")
    calls = _spy_on_fused(monkeypatch)
    num, den = torch.randn(1, 6), torch.randn(8, 4)
    big = torch.randn(rc.COMPILE_MIN_NUMEL // 64, 64)
    torch.testing.assert_close(rc.rational_cpu(big, num, den), rational_reference(big, num, den))
    rc.rational_cpu(big[:10], num, den)
    assert calls == []
    rc.rational_cpu(big[:10], num, den, compile=False)
    assert calls == [(torch.Size([10, 64]), False)]


def test_first_compilation_logs_one_line(monkeypatch, caplog):
    monkeypatch.setattr(rc, "_compiled_dtypes", set())
    _spy_on_fused(monkeypatch)
    x = torch.randn(50, 16, requires_grad=True)
    num, den = torch.randn(1, 6, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    with caplog.at_level(logging.INFO, logger=rc.__name__):
        for _ in range(2):
            rc.rational_cpu(x, num, den, compile=True).sum().backward()
        rc.rational_cpu(x.double(), num, den, compile=True).sum().backward()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 1 and "compiling the fused CPU rational kernels" in lines[0]
    assert rc._compiled_dtypes == {(n, d) for n in ("forward", "backward") for d in (torch.float32, torch.float64)}
