"""Triton Group-Rational kernels against the float64 reference.

On CPU the kernels run in Triton's interpreter: every test here sets ``TRITON_INTERPRET=1`` through ``monkeypatch``
(restored afterwards) and the kernels read it per call, so other test modules in the same process - in any order,
under pytest-xdist too - keep running compiled Triton (or no Triton) as before. On a CUDA machine the same checks
run once more on the GPU, without the interpreter.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from hf_kan.errors import BackendUnavailableError  # noqa: E402
from hf_kan.ops.rational import group_rational, rational_reference  # noqa: E402
from hf_kan.ops.rational import triton as rt  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def device(request, monkeypatch):
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make every ``torch.empty`` in the launchers NaN-filled, so an element the kernel forgets to write fails."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(rt.torch, "empty", nan_empty)


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def _float64_reference(x, num, den, grad_out, channel_dim=-1):
    """Output and (x, numerator, denominator) gradients of the reference, all computed in float64."""
    xd, nd, dd = (t.detach().double().cpu().requires_grad_(True) for t in (x, num, den))
    xin = xd.movedim(1, -1) if channel_dim == 1 else xd
    out = rational_reference(xin, nd, dd)
    out = out.movedim(-1, 1) if channel_dim == 1 else out
    out.backward(grad_out.detach().double().cpu())
    return out.detach(), xd.grad, nd.grad, dd.grad


def _run_kernel(x, num, den, grad_out, **kwargs):
    xk, nk, dk = (t.detach().clone().requires_grad_(True) for t in (x, num, den))
    out = rt.rational_triton(xk, nk, dk, **kwargs)
    out.backward(grad_out)
    return out.detach(), xk.grad, nk.grad, dk.grad


def _coefficients(groups, shared, device, dtype=torch.float32):
    num = torch.randn(1 if shared else groups, 6, device=device, dtype=dtype)
    den = torch.randn(groups, 4, device=device, dtype=dtype)
    return num, den


def _assert_all_close(got, ref, tol):
    names = ("output", "grad_x", "grad_numerator", "grad_denominator")
    for name, g, r in zip(names, got, ref):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name} has unwritten (NaN) elements"
        assert _rel(g.cpu(), r) < tol, f"{name}: relative error {_rel(g.cpu(), r):.2e} >= {tol}"


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize(
    "shape,groups,shared,deterministic",
    [
        ((3, 37, 24), 8, True, False),
        ((3, 37, 24), 8, False, True),
        ((301, 21), 3, False, False),
        ((301, 21), 3, True, True),
        ((2, 3, 5, 200), 8, True, False),
        ((77, 5), 1, False, False),
    ],
)
def test_fp32_forward_and_all_gradients(device, poisoned_empty, shape, groups, shared, deterministic):
    x = torch.randn(shape, device=device) * 1.5
    num, den = _coefficients(groups, shared, device)
    grad_out = torch.randn(shape, device=device)
    got = _run_kernel(x, num, den, grad_out, deterministic=deterministic)
    _assert_all_close(got, _float64_reference(x, num, den, grad_out), tol=2e-6)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_non_contiguous_inputs_and_grad_out(device, poisoned_empty):
    groups, channels = 4, 36
    base = torch.randn(5, 2 * channels, 41, device=device)
    x = base.transpose(1, 2)[..., ::2]  # [5, 41, 36], channel stride 2: used through strides, no copy
    assert not x.is_contiguous()
    num, den = _coefficients(groups, False, device)
    grad_out = torch.randn(1, 41, channels, device=device).expand(5, 41, channels)  # batch stride 0
    got = _run_kernel(x, num, den, grad_out)
    _assert_all_close(got, _float64_reference(x, num, den, grad_out), tol=2e-6)

    y = torch.randn(9, 7, channels, device=device).transpose(0, 1)  # leading dims not mergeable: copied
    grad_y = torch.randn(7, 9, channels, device=device)
    got = _run_kernel(y, num, den, grad_y)
    _assert_all_close(got, _float64_reference(y, num, den, grad_y), tol=2e-6)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("shared", [True, False])
def test_channels_first_input(device, poisoned_empty, shared):
    groups = 3
    x = torch.randn(3, 12, 11, 13, device=device)  # (N, C, H, W), H*W = 143 rows per image
    num, den = _coefficients(groups, shared, device)
    grad_out = torch.randn_like(x)
    got = _run_kernel(x, num, den, grad_out, channel_dim=1)
    ref = _float64_reference(x, num, den, grad_out, channel_dim=1)
    _assert_all_close(got, ref, tol=2e-6)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    # channels-first through the dispatcher, every backend agrees
    for backend in ("reference", "cpu", "triton") if device == "cpu" else ("reference", "triton"):
        out = group_rational(x, num, den, backend=backend, channel_dim=1)
        assert _rel(out.cpu(), ref[0]) < 2e-6, backend


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(device, poisoned_empty, dtype):
    groups = 4
    x = (torch.randn(3, 29, 20, device=device) * 1.5).to(dtype)
    num, den = _coefficients(groups, True, device)
    grad_out = torch.randn(x.shape, device=device).to(dtype)
    got = _run_kernel(x, num, den, grad_out)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    # reference on the same (rounded) inputs, in float64: the only error left is the kernel's own rounding
    _assert_all_close(got, _float64_reference(x, num, den, grad_out), tol=1e-2)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_half_precision_coefficients(device, poisoned_empty):
    x = torch.randn(19, 16, device=device, dtype=torch.bfloat16)
    num, den = _coefficients(2, False, device, dtype=torch.bfloat16)
    grad_out = torch.randn(x.shape, device=device, dtype=torch.bfloat16)
    got = _run_kernel(x, num, den, grad_out)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    _assert_all_close(got, _float64_reference(x, num, den, grad_out), tol=1e-2)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_partial_gradients(device, poisoned_empty):
    """Only the gradients autograd asks for are computed and returned."""
    x = torch.randn(23, 12, device=device)
    num, den = _coefficients(3, False, device)
    grad_out = torch.randn_like(x)
    ref = _float64_reference(x, num, den, grad_out)

    xk = x.clone().requires_grad_(True)
    rt.rational_triton(xk, num, den).backward(grad_out)
    assert _rel(xk.grad.cpu(), ref[1]) < 2e-6

    nk, dk = num.clone().requires_grad_(True), den.clone().requires_grad_(True)
    rt.rational_triton(x, nk, dk).backward(grad_out)
    assert _rel(nk.grad.cpu(), ref[2]) < 2e-6 and _rel(dk.grad.cpu(), ref[3]) < 2e-6

    gx, gn, gd = rt.rational_backward(grad_out, x, num, den, compute_coef=False)
    assert gn is None and gd is None and _rel(gx.cpu(), ref[1]) < 2e-6


def _naive_fp32_coefficient_grads(x, num, den, grad_out):
    """The per-element-atomic scheme of the original kernels: fp32 contributions added one by one, in order."""
    groups = den.shape[0]
    xg = x.reshape(-1, groups, x.shape[-1] // groups).transpose(0, 1).reshape(groups, -1)  # [G, elements]
    gg = grad_out.reshape(-1, groups, x.shape[-1] // groups).transpose(0, 1).reshape(groups, -1)
    a = num.expand(groups, 6)[:, :, None]
    b = den.abs()[:, :, None]
    p = sum(a[:, i] * xg**i for i in range(6))
    q = 1 + sum(b[:, i - 1] * xg.abs() ** i for i in range(1, 5))
    r, s = gg / q, gg * p / q**2
    contrib = [r * xg**i for i in range(6)] + [s * xg.abs() ** i for i in range(1, 5)]
    seq = np.stack([np.cumsum(c.numpy(), axis=1, dtype=np.float32)[:, -1] for c in contrib], axis=1)  # [G, 10]
    sums = torch.from_numpy(seq)
    grad_num = sums[:, :6].sum(0, keepdim=True) if num.shape[0] == 1 else sums[:, :6]
    return grad_num, -torch.sign(den) * sums[:, 6:]


def test_coefficient_gradient_error_not_worse_than_naive_fp32_sum(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    groups = 2
    x = torch.randn(2053, 64) * 1.5
    num, den = _coefficients(groups, False, "cpu")
    grad_out = torch.randn_like(x)
    _, _, ref_num, ref_den = _float64_reference(x, num, den, grad_out)
    naive_num, naive_den = _naive_fp32_coefficient_grads(x, num, den, grad_out)
    _, kernel_num, kernel_den = rt.rational_backward(grad_out, x, num, den, compute_dx=False)
    for kernel, naive, ref in ((kernel_num, naive_num, ref_num), (kernel_den, naive_den, ref_den)):
        kernel_err, naive_err = _rel(kernel, ref), _rel(naive, ref)
        assert naive_err > 0  # the comparison means something only if the naive sum does round
        assert kernel_err <= naive_err, (kernel_err, naive_err)
        assert kernel_err < 1e-6


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_deterministic_mode_is_reproducible(device):
    x = torch.randn(130, 40, device=device)
    num, den = _coefficients(4, True, device)
    grad_out = torch.randn_like(x)
    first = rt.rational_backward(grad_out, x, num, den, deterministic=True)
    second = rt.rational_backward(grad_out, x, num, den, deterministic=True)
    atomic = rt.rational_backward(grad_out, x, num, den, deterministic=False)
    for f, s, a in zip(first, second, atomic):
        assert torch.equal(f, s)
        assert _rel(a, f) < 1e-6


def test_in_program_row_loop_matches_one_tile_per_program(monkeypatch):
    """Programs that loop over many row tiles give the same sums as one tile per program."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(333, 24)
    num, den = _coefficients(3, False, "cpu")
    grad_out = torch.randn_like(x)
    ref = _float64_reference(x, num, den, grad_out)
    for max_row_programs in (1, 2, 1000):
        _, gn, gd = rt.rational_backward(grad_out, x, num, den, compute_dx=False, max_row_programs=max_row_programs)
        assert _rel(gn, ref[2]) < 2e-6 and _rel(gd, ref[3]) < 2e-6


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_empty_input(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    num, den = _coefficients(4, True, device)
    num.requires_grad_(True)
    out = rt.rational_triton(x, num, den)
    out.sum().backward()
    assert out.shape == (0, 16) and torch.equal(num.grad, torch.zeros_like(num))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        group_rational(torch.randn(4, 8), torch.randn(1, 6), torch.randn(2, 4), backend="triton")


def test_triton_rejects_float64_and_bad_channel_dim(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="float64"):
        rt.rational_forward(torch.randn(4, 8, dtype=torch.float64), torch.randn(1, 6), torch.randn(2, 4))
    with pytest.raises(ValueError, match="channel_dim"):
        rt.rational_forward(torch.randn(4, 8, 3), torch.randn(1, 6), torch.randn(2, 4), channel_dim=0)


def _sm90_toolchain_available():
    import os

    import triton

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.slow
@pytest.mark.skipif(not _sm90_toolchain_available(), reason="needs Triton's bundled NVIDIA toolchain (ptxas)")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time build of both kernels for an H100 (sm_90): catches what the interpreter does not check.

    Also pins the backward's reduction scheme: exactly ten global atomics in the atomic build (one per coefficient
    per program), none in the deterministic build.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", 90, 32)
    fwd_sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "num_ptr": "*fp32", "den_ptr": "*fp32", "n_rows": "i32"}
    fwd_sig.update({name: "i64" for name in ("x_stride_b", "x_stride_r", "x_stride_c")})
    fwd_sig.update({name: "i64" for name in ("out_stride_b", "out_stride_r", "out_stride_c", "num_stride_g")})
    fwd_const = {"C": 768, "GROUP_SIZE": 96, "BLOCK_R": 16, "BLOCK_C": 128}
    fwd_sig.update({name: "constexpr" for name in fwd_const})
    fwd = triton.compile(ASTSource(JITFunction(rt._rational_fwd_kernel), fwd_sig, fwd_const), target=target)
    assert "st.global" in fwd.asm["ptx"]

    bwd_sig = {name: "*bf16" for name in ("x_ptr", "grad_out_ptr", "grad_x_ptr")}
    bwd_sig.update({"num_ptr": "*fp32", "den_ptr": "*fp32", "partial_ptr": "*fp32", "n_rows": "i32"})
    for prefix in ("x", "go", "gx"):
        bwd_sig.update({f"{prefix}_stride_{d}": "i64" for d in "brc"})
    bwd_sig.update({"num_stride_g": "i32", "partial_stride_p": "i32", "batch_offset": "i32"})
    for atomic in (True, False):
        const = {"G": 8, "GROUP_SIZE": 96, "BLOCK_R": 4, "BLOCK_C": 128, "COMPUTE_DX": True, "COMPUTE_COEF": True}
        const["ATOMIC"] = atomic
        sig = dict(bwd_sig, **{name: "constexpr" for name in const})
        bwd = triton.compile(ASTSource(JITFunction(rt._rational_bwd_kernel), sig, const), target=target)
        assert bwd.asm["ptx"].count("atom.global") == (10 if atomic else 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_no_recompilation_across_batch_and_sequence_lengths(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fwd_kernel, bwd_kernel = rt._kernels(False)
    num, den = _coefficients(8, True, "cuda")
    num.requires_grad_(True)

    def run(rows):
        x = torch.randn(rows, 197, 192, device="cuda", requires_grad=True)
        rt.rational_triton(x, num, den).sum().backward()

    def n_compiled():  # device_caches[device] = (kernel_cache, kernel_key_cache, target, backend, binder)
        kernels = (fwd_kernel, bwd_kernel)
        return sum(len(caches[0]) for k in kernels for caches in k.device_caches.values())

    run(2)
    before = n_compiled()
    assert before >= 2  # forward and backward were compiled
    for rows in (3, 16, 5, 33):
        run(rows)
    assert n_compiled() == before


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_second_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(17, 24, device="cuda:1")
    num, den = _coefficients(8, False, "cuda:1")
    grad_out = torch.randn_like(x)
    got = _run_kernel(x, num, den, grad_out)
    _assert_all_close(got, _float64_reference(x, num, den, grad_out), tol=2e-6)
    assert got[0].device == x.device


@pytest.mark.slow
def test_torch_compile_puts_the_kernels_in_one_graph(monkeypatch):
    """Under ``torch.compile(fullgraph=True)`` (no graph break allowed) the Triton path matches eager."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 9, 24)
    num, den = _coefficients(4, True, "cpu")
    grad_out = torch.randn_like(x)

    def model(x, num, den):
        return rt.rational_triton(x * 1.5, num, den).sum(-1)

    results = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        xk, nk, dk = (t.clone().requires_grad_(True) for t in (x, num, den))
        out = fn(xk, nk, dk)
        out.backward(grad_out.sum(-1))
        results.append((out.detach(), xk.grad, nk.grad, dk.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
