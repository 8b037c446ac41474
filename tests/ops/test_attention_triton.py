"""Triton attention kernels (forward with VAR, backward, score taps) against the float64 reference.

On CPU the kernels run in Triton's interpreter: every test sets ``TRITON_INTERPRET=1`` through ``monkeypatch``
(restored afterwards) and the kernels read it per call, so other test modules keep running as before. On a CUDA
machine the same checks run once more on the GPU, compiled. Outputs are NaN-poisoned before every call (integers
filled with 77), shapes are odd (not multiples of the 16-wide interpreter tiles, several tiles per program), and the
metric is the relative RMS error against the reference computed in float64 on the same (rounded) inputs.
"""

import pytest
import torch

pytest.importorskip("triton")

from hf_kan.errors import BackendUnavailableError  # noqa: E402
from hf_kan.ops import attention as A  # noqa: E402
from hf_kan.ops.attention import (  # noqa: E402
    VARSpec,
    attention_taps,
    attention_taps_reference,
    masked_attention,
    masked_attention_reference,
)
from hf_kan.ops.attention import triton as at  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 5e-5, torch.float16: 8e-3, torch.bfloat16: 4e-2}


@pytest.fixture
def device(request, monkeypatch):
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(A.BACKEND_ENV_VAR, raising=False)
    return request.param


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every ``torch.empty`` in the launchers comes back NaN-filled (integers: 77), so unwritten elements fail."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        t.fill_(float("nan") if t.is_floating_point() else 77)
        return t

    monkeypatch.setattr(at.torch, "empty", poisoned)


def _rel(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---- metadata scenarios -----------------------------------------------------------------------------------------


def _scenario(name: str, b: int, t: int, s: int, seed: int = 0) -> dict:
    """Metadata of one test scenario: q_pos / k_pos / k_valid and, where the scenario has them, MMA and a window."""
    g = torch.Generator().manual_seed(seed)
    meta: dict = {}
    if name in ("causal", "window", "gqa"):
        k_pos = torch.arange(s).expand(b, s)
        meta.update(k_pos=k_pos, q_pos=k_pos[:, s - t:])
        if name == "window":
            meta["window"] = 7
    elif name == "padding":  # left padding of different lengths; padding queries see only themselves
        k_pos = torch.arange(s).expand(b, s)
        pad = torch.tensor([5, 0, 19][:b])
        meta.update(k_pos=k_pos, q_pos=k_pos[:, s - t:], k_valid=k_pos >= pad[:, None])
    elif name in ("pruned", "decode", "combo"):  # kept subsets of a longer sequence, empty (-1) slots in between
        rows, valid = [], []
        for _ in range(b):
            kept = torch.randperm(3 * s, generator=g)[: s - 4].sort().values
            slots = torch.cat([kept[: s // 2], torch.full((3,), -1), kept[s // 2:], torch.full((1,), -1)])
            rows.append(slots)
            valid.append((slots >= 0) & (torch.rand(s, generator=g) > 0.15))  # some padding keys too
        k_pos = torch.stack(rows)
        meta.update(k_pos=k_pos, k_valid=torch.stack(valid))
        top = k_pos.amax(-1, keepdim=True)
        if name == "decode":  # one new token whose key is the last slot: the HF decode step
            k_pos = torch.cat([k_pos[:, :-1], top + 3], 1)
            meta.update(k_pos=k_pos, k_valid=torch.cat([meta["k_valid"][:, :-1], torch.ones(b, 1, dtype=bool)], 1),
                        q_pos=top + 3)
        else:
            q_pos = k_pos[:, s - t:].clone()
            q_pos[:, 1] = -1  # an empty query slot
            meta["q_pos"] = q_pos
    if name in ("mma", "combo"):
        if "k_pos" not in meta:
            k_pos = torch.arange(s).expand(b, s)
            meta.update(k_pos=k_pos, q_pos=k_pos[:, s - t:])
        k_pos, q_pos = meta["k_pos"], meta["q_pos"]
        hi = int(k_pos.max())
        image_k = (k_pos >= hi // 5) & (k_pos < hi // 2)
        meta["k_text"] = ~image_k & (k_pos >= 0)
        image_q = (q_pos >= hi // 5) & (q_pos < hi // 2)
        meta["q_span_end"] = torch.where(image_q, torch.full_like(q_pos, hi - 3), q_pos)
    if name == "combo":
        meta["window"] = 11
    return meta


def _tensors(b, h, hkv, t, s, d, dtype, device, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g) * scale
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def _on(meta, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in meta.items()}


def _reference(q, k, v, meta, var=None, grad_out=None):
    """Output, lse, selection and (given ``grad_out``) q/k/v gradients of the reference, in float64 on CPU."""
    leaves = [x.detach().cpu().double().requires_grad_(grad_out is not None) for x in (q, k, v)]
    res = masked_attention_reference(*leaves, var=var and _var_cpu(var), **_on(meta, "cpu"))
    grads = None
    if grad_out is not None:
        res.out.backward(grad_out.detach().cpu().double())
        grads = [x.grad for x in leaves]
    return res, grads


def _var_cpu(var):
    return VARSpec(var.sink.cpu(), var.image.cpu(), var.query.cpu(), var.p, var.rho, var.min_image_attention)


def _check_forward(res, ref, dtype):
    assert res.out.dtype == dtype
    assert torch.isfinite(res.out).all(), "unwritten (NaN) output elements"
    assert _rel(res.out, ref.out) < TOL[dtype], f"out rel error {_rel(res.out, ref.out):.2e}"
    lse, ref_lse = res.lse.cpu(), ref.lse
    assert not torch.isnan(lse).any(), "unwritten lse"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() < 50 * TOL[dtype]


SCENARIOS = [  # (name, B, H, H_kv, T, S, D)
    ("causal", 2, 2, 2, 37, 37, 32),
    ("padding", 3, 2, 1, 23, 29, 16),
    ("mma", 2, 2, 1, 33, 33, 32),
    ("window", 1, 3, 1, 40, 40, 16),
    ("pruned", 2, 2, 1, 17, 41, 16),
    ("decode", 2, 4, 2, 1, 53, 32),
    ("gqa", 1, 6, 2, 19, 19, 80),
    ("combo", 2, 4, 2, 21, 43, 16),
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("name,b,h,hkv,t,s,d", SCENARIOS, ids=[c[0] for c in SCENARIOS])
def test_forward_and_gradients_fp32(device, poisoned_empty, name, b, h, hkv, t, s, d):
    meta = _scenario(name, b, t, s)
    q, k, v = _tensors(b, h, hkv, t, s, d, torch.float32, device)
    grad_out = torch.randn(b, h, t, d).to(device)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    res = masked_attention(*leaves, return_lse=True, backend="triton", **_on(meta, device))
    res.out.backward(grad_out)
    ref, ref_grads = _reference(q, k, v, meta, grad_out=grad_out)
    _check_forward(res, ref, torch.float32)
    for label, leaf, want in zip(("dq", "dk", "dv"), leaves, ref_grads):
        assert leaf.grad.shape == leaf.shape and torch.isfinite(leaf.grad).all(), f"{label} unwritten"
        assert _rel(leaf.grad, want) < GRAD_TOL[torch.float32], f"{label} rel error {_rel(leaf.grad, want):.2e}"
    assert res.out.transpose(1, 2).is_contiguous()  # (B, T, H, D) storage, what Transformers returns


def _var_case(meta, b, t, s, seed=0, device="cpu"):
    """Image keys in the middle, sinks at position 0 (text) and on two image keys, eligible queries after the image."""
    g = torch.Generator().manual_seed(seed)
    k_pos, q_pos = meta["k_pos"], meta["q_pos"]
    hi = int(k_pos.max())
    image = (k_pos >= hi // 5) & (k_pos < hi // 2)
    first = torch.where(k_pos >= 0, k_pos, k_pos.max()).amin(-1, keepdim=True)
    sink = (k_pos == first) | (image & (torch.rand(b, s, generator=g) < 0.2))
    query = (q_pos >= hi // 2) & (torch.rand(b, t, generator=g) < 0.8)
    return VARSpec(sink.to(device), image.to(device), query.to(device), p=0.6, rho=0.5, min_image_attention=0.2)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("name,b,h,hkv,t,s,d", [("causal", 2, 3, 1, 29, 29, 32), ("combo", 2, 2, 2, 21, 43, 16),
                                                ("decode", 3, 2, 1, 1, 45, 16)], ids=["causal", "combo", "decode"])
def test_var_in_the_kernel_equals_the_explicit_rule(device, poisoned_empty, name, b, h, hkv, t, s, d):
    meta = _scenario(name, b, t, s, seed=1)
    if "window" in meta:
        meta["window"] = 60  # wide enough to reach the image and the sinks
    var = _var_case(meta, b, t, s, device=device)
    q, k, v = _tensors(b, h, hkv, t, s, d, torch.float32, device, scale=2.0, seed=1)
    res = masked_attention(q, k, v, var=var, return_lse=True, backend="triton", **_on(meta, device))
    ref, _ = _reference(q, k, v, meta, var=var)
    _check_forward(res, ref, torch.float32)
    sel = res.var_selected
    assert sel.dtype == torch.bool and sel.view(torch.int8).le(1).all(), "unwritten selection flags"
    assert torch.equal(sel.cpu(), ref.var_selected)
    if name != "decode":
        assert ref.var_selected.any() and not ref.var_selected.all()  # the case exercises both branches
    plain = masked_attention_reference(*(x.cpu().double() for x in (q, k, v)), **_on(meta, "cpu")).out
    changed = (ref.out - plain).abs().amax(-1) > 1e-9
    assert (changed <= ref.var_selected).all()  # VAR changes selected rows only (not those that see no sink)
    assert changed.any() or name == "decode"
    # the auto backend with gradients falls back to the reference, which differentiates through VAR
    qg = q.clone().requires_grad_(True)
    out = masked_attention(qg, k, v, var=var, **_on(meta, device))
    out.sum().backward()
    assert _rel(out, ref.out) < TOL[torch.float32] and torch.isfinite(qg.grad).all()
    with pytest.raises(BackendUnavailableError, match="no backward through VAR"):
        masked_attention(qg, k, v, var=var, backend="triton", **_on(meta, device))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(device, poisoned_empty, dtype):
    b, h, hkv, t, s, d = 2, 2, 1, 27, 35, 32
    meta = _scenario("combo", b, t, s, seed=2)
    q, k, v = _tensors(b, h, hkv, t, s, d, dtype, device, seed=2)
    grad_out = torch.randn(b, h, t, d).to(device, dtype)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    res = masked_attention(*leaves, return_lse=True, backend="triton", **_on(meta, device))
    res.out.backward(grad_out)
    ref, ref_grads = _reference(q, k, v, meta, grad_out=grad_out)
    _check_forward(res, ref, dtype)
    for label, leaf, want in zip(("dq", "dk", "dv"), leaves, ref_grads):
        assert leaf.grad.dtype == dtype and _rel(leaf.grad, want) < GRAD_TOL[dtype], label
    var = _var_case(meta, b, t, s, device=device)
    res = masked_attention(q, k, v, var=var, return_lse=True, backend="triton", **_on(meta, device))
    ref, _ = _reference(q, k, v, meta, var=var)
    assert _rel(res.out, ref.out) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rows_with_nothing_visible_are_zero_with_finite_gradients(device, poisoned_empty):
    b, h, t, s, d = 1, 2, 5, 20, 16
    k_pos = torch.arange(s)[None]
    q_pos = torch.tensor([[-1, 3, -1, 19, 30]])  # -1: empty slots (no -1 keys); 30: sees every key
    k_valid = k_pos % 3 != 0
    q, k, v = _tensors(b, h, h, t, s, d, torch.float32, device)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    res = masked_attention(*leaves, q_pos=q_pos.to(device), k_pos=k_pos.to(device), k_valid=k_valid.to(device),
                           return_lse=True, backend="triton")
    res.out.sum().backward()
    assert (res.out[:, :, [0, 2]] == 0).all() and torch.isinf(res.lse[:, :, [0, 2]]).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves) and (leaves[0].grad[:, :, [0, 2]] == 0).all()
    ref, _ = _reference(q, k, v, dict(q_pos=q_pos, k_pos=k_pos, k_valid=k_valid))
    assert _rel(res.out, ref.out) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_strided_inputs_and_broadcast_metadata(device, poisoned_empty):
    """q as Transformers hands it over ((B, T, H, D) projections viewed as (B, H, T, D)), K/V slices of a larger cache,
    positions shared by the batch ((1, S) metadata)."""
    b, h, hkv, t, s, d = 2, 4, 2, 18, 26, 16
    q = torch.randn(b, t, h, d, device=device).transpose(1, 2)
    cache = torch.randn(2, b, hkv, s + 9, d, device=device)
    k, v = cache[0, :, :, :s], cache[1, :, :, :s]
    assert not q.is_contiguous() and not k.is_contiguous()
    k_pos = torch.arange(s, device=device)[None]
    meta = dict(q_pos=k_pos[:, s - t:], k_pos=k_pos, window=9)
    out = masked_attention(q, k, v, backend="triton", **meta)
    ref, _ = _reference(q, k, v, meta)
    assert _rel(out, ref.out) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_score_taps(device, poisoned_empty):
    b, h, hkv, t, s, d = 2, 4, 2, 31, 31, 16
    meta = _scenario("mma", b, t, s, seed=3)
    q, k, v = _tensors(b, h, hkv, t, s, d, torch.float32, device, seed=3)
    res = masked_attention(q, k, v, return_lse=True, backend="triton", **_on(meta, device))
    last = torch.tensor([t - 1])  # FastV / PDrop: the last prompt row
    text_rows = torch.arange(t - 12, t)  # the text-mean variant: rows after the image, equal weights
    for rows, w in ((last, torch.ones(b, 1)), (text_rows, torch.full((b, 12), 1 / 12))):
        row_meta = dict(_on(meta, device), q_pos=meta["q_pos"][:, rows].to(device),
                        q_span_end=meta["q_span_end"][:, rows].to(device))
        want = attention_taps_reference(q[:, :, rows].cpu().double(), k.cpu().double(), w.double(),
                                        **_on(row_meta, "cpu"))
        for lse in (res.lse[:, :, rows.to(device)], None):  # from the forward, or computed for the rows
            got = attention_taps(q[:, :, rows], k, w.to(device), lse=lse, backend="triton", **row_meta)
            assert got.shape == (b, s) and torch.isfinite(got).all()
            assert _rel(got, want) < 2e-5
        torch.testing.assert_close(got.sum(-1).cpu(), torch.ones(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_auto_dispatch_uses_the_kernel(device, monkeypatch):
    calls = []
    real = at.attention_forward
    monkeypatch.setattr(at, "attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _tensors(1, 2, 2, 5, 5, 16, torch.float32, device)
    pos = torch.arange(5, device=device)[None]
    out = masked_attention(q, k, v, q_pos=pos, k_pos=pos)
    assert calls and _rel(out, _reference(q, k, v, dict(q_pos=pos, k_pos=pos))[0].out) < TOL[torch.float32]


def test_launch_configuration_override_and_length_arguments_not_specialised(monkeypatch, poisoned_empty):
    """The tuning hook (``config=``, what ``benchmarks/attention.py --sweep`` times) computes the same numbers with
    other tile shapes, and every length-dependent kernel argument is excluded from specialisation (a new length
    must not compile a new kernel)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    b, h, hkv, t, s, d = 1, 2, 1, 45, 45, 16
    meta = _scenario("combo", b, t, s, seed=4)
    q, k, v = _tensors(b, h, hkv, t, s, d, torch.float32, "cpu", seed=4)
    q_meta = at.pack_query_meta(meta["q_pos"], meta["q_span_end"], None, b)
    k_meta = at.pack_key_meta(meta["k_pos"], meta["k_valid"], meta["k_text"], None, None, b)
    kw = dict(scale=d**-0.5, window=meta["window"], has_mma=True)
    ref, grads = _reference(q, k, v, meta, grad_out=torch.ones(b, h, t, d))
    out, lse, _ = at.attention_forward(q, k, v, q_meta, k_meta, config=(32, 16, 1, 1), **kw)
    assert _rel(out, ref.out) < TOL[torch.float32]
    got = at.attention_backward(torch.ones_like(out), q, k, v, out, lse, q_meta, k_meta, config=(16, 32, 1, 1), **kw)
    for g, want in zip(got, grads):
        assert _rel(g, want) < GRAD_TOL[torch.float32]

    import inspect

    for kernel, fn in zip(at._kernels(False), at._KERNELS):
        names = list(inspect.signature(fn).parameters)
        length_args = {"n_q", "n_k", "n_rows", "window", "lse_stride_b", "lse_stride_h", "qm_stride_b",
                       "km_stride_b", "w_stride_b", "out_stride_b"} & set(names)
        excluded = {names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
        assert length_args and excluded == length_args, fn.__name__


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [96, 128])
def test_model_head_dims_with_every_feature(monkeypatch, poisoned_empty, head_dim):
    """Head dims of the supported models (96: padded to a 128 block; 128; 64 and 80 are in the fast tests' cases
    and the sm_90 build), with padding, pruned keys, MMA, a window and GQA together: forward, gradients and VAR
    against the float64 reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    b, h, hkv, t, s = 2, 4, 2, 35, 51
    meta = _scenario("combo", b, t, s, seed=5)
    q, k, v = _tensors(b, h, hkv, t, s, head_dim, torch.float32, "cpu", seed=5)
    grad_out = torch.randn(b, h, t, head_dim)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    res = masked_attention(*leaves, return_lse=True, backend="triton", **meta)
    res.out.backward(grad_out)
    ref, ref_grads = _reference(q, k, v, meta, grad_out=grad_out)
    _check_forward(res, ref, torch.float32)
    for leaf, want in zip(leaves, ref_grads):
        assert _rel(leaf.grad, want) < GRAD_TOL[torch.float32]
    meta["window"] = 60
    var = _var_case(meta, b, t, s, seed=5)
    res = masked_attention(q * 2, k, v, var=var, return_lse=True, backend="triton", **meta)
    ref, _ = _reference(q * 2, k, v, meta, var=var)
    _check_forward(res, ref, torch.float32)
    assert torch.equal(res.var_selected, ref.var_selected)


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
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_compile_for_sm90_without_a_gpu(head_dim):
    """Ahead-of-time build of every kernel, in the GPU launch configurations, for an H100/H200 (sm_90): catches what
    the interpreter does not check (types, constexpr globals, shapes the tensor cores need), and that the matrix
    products run on Hopper's wgmma instructions."""
    import inspect

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    pointers = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "w_ptr": "*fp32", "sel_ptr": "*i8", "q_meta_ptr": "*i32",
                "k_meta_ptr": "*i32"}
    floats = {"qk_scale", "sm_scale", "var_p", "var_rho", "var_min_image"}

    def build(fn, const, warps, stages):
        sig = {}
        for name in inspect.signature(fn).parameters:
            if name in const:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = pointers.get(name, "*fp32" if fn is at._attention_taps_kernel and name == "out_ptr"
                                         else "*bf16")
            else:
                sig[name] = "fp32" if name in floats else "i32"
        src = ASTSource(JITFunction(fn), sig, const)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))

    common = dict(HEAD_DIM=head_dim, BLOCK_D=at._block_d(head_dim), HAS_WINDOW=True, HAS_MMA=True, PRECISION="tf32",
                  DOT_DTYPE=tl.bfloat16)
    for has_var in (False, True):
        bm, bn, warps, stages = at._fwd_config(head_dim, 4096, has_var, False)
        k = build(at._attention_fwd_kernel, dict(common, BLOCK_M=bm, BLOCK_N=bn, HAS_VAR=has_var, STORE_LSE=True),
                  warps, stages)
        assert "wgmma" in k.asm["ptx"]
    if head_dim != 128:  # the other kernels once, at the common head dim
        return
    bm, bn, warps, stages = at._bwd_config(head_dim, False)
    for fn in (at._attention_bwd_dkdv_kernel, at._attention_bwd_dq_kernel):
        assert "wgmma" in build(fn, dict(common, BLOCK_M=bm, BLOCK_N=bn), warps, stages).asm["ptx"]
    build(at._attention_taps_kernel, dict(common, BLOCK_M=16, BLOCK_N=64), 4, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_no_recompilation_across_lengths_and_batch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = at._kernels(False)

    def run(b, t, s):
        q, k, v = (x.requires_grad_(True) for x in _tensors(b, 4, 2, t, s, 64, torch.bfloat16, "cuda"))
        k_pos = torch.arange(s, device="cuda")[None]
        masked_attention(q, k, v, q_pos=k_pos[:, s - t:], k_pos=k_pos, backend="triton").sum().backward()

    def n_compiled():  # device_caches[device] = (kernel_cache, ...)
        return sum(len(c[0]) for kern in kernels for c in kern.device_caches.values())

    run(2, 300, 300)
    before = n_compiled()
    assert before >= 3  # forward, dK/dV, dQ
    for b, t, s in ((1, 1000, 1000), (3, 257, 511), (2, 131, 131)):
        run(b, t, s)
    assert n_compiled() == before
