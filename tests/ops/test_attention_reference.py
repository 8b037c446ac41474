"""The attention reference (visibility rule, VAR, taps) against the engine's rules, and the backend dispatch.

The visibility rule must be exactly the engine's bool-mask rule (``patches.engine.masks.base_mask`` widened by
``patches.mma.mma_rule``), the window Transformers' ``sliding_window_overlay``, VAR the engine's ``redistribute`` and
the taps the scorers' ``attention_votes``: each is compared here on the same inputs.
"""

import pytest
import torch
from hf_kan.patches.engine.layout import IMAGE, PAD, TEXT, VIDEO, TokenLayout
from hf_kan.patches.engine.masks import base_mask
from hf_kan.patches.mma.runtime import mma_rule
from hf_kan.patches.prune.scorers.base import attention_votes
from hf_kan.patches.var.runtime import redistribute
from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

from hf_kan.errors import BackendUnavailableError, InputLayoutError
from hf_kan.ops import attention as A
from hf_kan.ops.attention import (
    VARSpec,
    attention_taps,
    attention_taps_reference,
    masked_attention,
    masked_attention_reference,
    var_redistribute,
    visibility_mask,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(A.BACKEND_ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _layout(modality, position, span_end=None):
    modality = torch.tensor(modality, dtype=torch.int8)
    position = torch.tensor(position)
    minus = torch.full(position.shape, -1)
    span = position.clone() if span_end is None else torch.tensor(span_end)
    return TokenLayout(modality, position, minus, minus, minus, minus, torch.zeros_like(position, dtype=torch.bool),
                       span)


def _engine_case():
    """A batch of two with padding, images, a video, MMA spans and pruned key sets. Sample 0: an empty query slot
    (position -1) and no empty key slot, so that row sees nothing; sample 1: empty query slots that see the empty key
    slots (the "own position" term), and a query whose own key was pruned."""
    T, I, V, P = TEXT, IMAGE, VIDEO, PAD
    q = _layout(
        [[P, T, I, I, T, T, V, P], [T, I, I, T, T, T, P, P]],
        [[0, 1, 2, 3, 4, 5, 6, -1], [0, 1, 2, 3, 4, 5, -1, -1]],
        [[0, 1, 5, 5, 4, 5, 7, -1], [0, 4, 4, 3, 4, 5, -1, -1]],
    )
    k = _layout(
        [[P, T, I, T, T, P, V, T, T], [T, I, I, P, T, T, P, P, T]],
        [[0, 1, 2, 4, 5, 8, 6, 7, 9], [0, 1, 2, -1, 4, 5, -1, -1, 8]],
    )
    return q, k


def _as_op_args(q, k, modalities=(IMAGE, VIDEO)):
    """The op's metadata from two layouts: MMA widens only visual queries of the configured modalities."""
    q_vis = torch.zeros_like(q.modality, dtype=torch.bool)
    for c in modalities:
        q_vis |= q.modality == c
    return dict(q_pos=q.position, k_pos=k.position, k_valid=k.valid,
                q_span_end=torch.where(q_vis, q.span_end, q.position), k_text=k.modality == TEXT)


@pytest.mark.parametrize("modalities", [("image", "video"), ("image",)])
def test_visibility_equals_the_engine_rule(modalities):
    q, k = _engine_case()
    engine = mma_rule(q, k, base_mask(q, k), modalities)
    codes = (IMAGE, VIDEO) if len(modalities) == 2 else (IMAGE,)
    ours = visibility_mask(**_as_op_args(q, k, codes))
    assert torch.equal(ours, engine)
    plain = visibility_mask(q.position, k.position, k.valid)
    assert torch.equal(plain, base_mask(q, k))
    assert not torch.equal(plain, ours)  # the case exercises MMA
    assert (~ours).all(-1).sum() == 1  # and one query row with nothing visible


def test_window_is_transformers_sliding_window_on_original_positions():
    s, window = 11, 4
    pos = torch.arange(s)[None]
    ours = visibility_mask(pos, pos, window=window)[0]
    fn = and_masks(causal_mask_function, sliding_window_overlay(window))
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    theirs = fn(torch.tensor(0), torch.tensor(0), i, j)
    assert torch.equal(ours, theirs)
    assert ours.sum(-1).max() == window
    # on a pruned key set the window counts original positions, not slots
    kp = torch.tensor([[0, 3, 4, 7, 8, 9]])
    got = visibility_mask(torch.tensor([[9]]), kp, window=3)[0, 0]
    assert got.tolist() == [False, False, False, True, True, True]


def test_empty_rows_and_own_position():
    # an empty query slot (-1) sees nothing when the keys have no empty slot, and only the empty key slots (own
    # position, -1 == -1) when they do, as in the engine
    allowed = visibility_mask(torch.tensor([[-1, 2]]), torch.tensor([[0, 1, 2]]))
    assert allowed[0, 0].sum() == 0 and allowed[0, 1].all()
    allowed = visibility_mask(torch.tensor([[-1]]), torch.tensor([[0, -1, 1, -1]]))
    assert allowed[0, 0].tolist() == [False, True, False, True]
    # padding key at the query's own position is visible to that query only
    allowed = visibility_mask(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), torch.tensor([[False, True]]))
    assert allowed[0].tolist() == [[True, False], [False, True]]


def _probs_case(seed, b=2, h=3, t=7, s=11):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(b, h, t, s, generator=g) * 3, -1)
    sink = torch.rand(b, 1, 1, s, generator=g) < 0.3
    image = torch.rand(b, 1, 1, s, generator=g) < 0.6
    query = torch.rand(b, 1, t, generator=g) < 0.7
    return probs, sink, image, query


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_var_rule_equals_the_engine_rule(seed, dtype):
    probs, sink, image, query = _probs_case(seed)
    probs = probs.to(dtype)
    for p, rho, m in ((0.6, 0.8, 0.2), (0.3, 0.3, 0.0), (1.0, 0.5, 0.1)):
        ours, sel = var_redistribute(probs, sink, image, query, p, rho, m)
        theirs, sel_e = redistribute(probs, sink, image, query, p, rho, m)
        assert torch.equal(ours, theirs) and torch.equal(sel, sel_e)
    assert sel.any() and not sel.all()


def test_reference_matches_sdpa_with_the_same_mask_and_has_no_nan():
    q, k = _engine_case()
    meta = _as_op_args(q, k)
    b, t, s = 2, 8, 9
    qq, kk, vv = torch.randn(b, 4, t, 16), torch.randn(b, 2, s, 16), torch.randn(b, 2, s, 16)
    res = masked_attention_reference(qq, kk, vv, **meta)
    allowed = visibility_mask(**meta)
    empty = ~allowed.any(-1)
    assert empty.sum() == 1
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        qq, kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1), attn_mask=(allowed | empty[..., None])[:, None])
    sdpa = sdpa.masked_fill(empty[:, None, :, None], 0)
    torch.testing.assert_close(res.out, sdpa, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(res.out).all() and (res.out[empty[:, None].expand(-1, 4, -1)] == 0).all()
    assert torch.isinf(res.lse[empty[:, None].expand(-1, 4, -1)]).all()
    # lse is the log-normaliser of the visible scores
    scores = torch.matmul(qq, kk.repeat_interleave(2, 1).transpose(-1, -2)) * 16**-0.5
    lse = torch.logsumexp(scores.masked_fill(~allowed[:, None], float("-inf")), -1)
    torch.testing.assert_close(res.lse[~empty[:, None].expand(-1, 4, -1)], lse[torch.isfinite(lse)])


def test_reference_gradcheck_float64_mask_only_and_with_var():
    q, k = _engine_case()
    meta = _as_op_args(q, k)
    g = torch.Generator().manual_seed(3)
    qq = torch.randn(2, 4, 8, 4, dtype=torch.float64, generator=g, requires_grad=True)
    kk = torch.randn(2, 2, 9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    vv = torch.randn(2, 2, 9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    for window in (None, 3):
        assert torch.autograd.gradcheck(
            lambda a, b, c, w=window: masked_attention_reference(a, b, c, window=w, **meta).out, (qq, kk, vv),
            fast_mode=True)
    image = k.modality == IMAGE
    var = VARSpec(sink=(k.position == 0) | (k.position == 2), image=image, query=q.position >= 4, p=0.4, rho=0.2,
                  min_image_attention=0.05)
    res = masked_attention_reference(qq * 2, kk, vv, var=var, **meta)
    assert res.var_selected.any()
    assert torch.autograd.gradcheck(lambda a, b, c: masked_attention_reference(a * 2, b, c, var=var, **meta).out,
                                    (qq, kk, vv), fast_mode=True)


def test_taps_reference_equals_the_engine_scorer():
    q, k = _engine_case()
    meta = _as_op_args(q, k)
    qq, kk = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 9, 16)
    weights = torch.zeros(2, 8)
    weights[0, 6] = 1.0  # FastV: last prompt row
    weights[1, 3:6] = 1 / 3  # text-mean: text rows after the image
    mask = visibility_mask(**meta)[:, None]
    engine = attention_votes(qq, kk, weights, mask, False, 16**-0.5, 2)
    rows = torch.tensor([3, 4, 5, 6])
    ours = attention_taps_reference(qq[:, :, rows], kk, weights[:, rows], q_pos=meta["q_pos"][:, rows],
                                    q_span_end=meta["q_span_end"][:, rows], k_pos=meta["k_pos"],
                                    k_valid=meta["k_valid"], k_text=meta["k_text"])
    torch.testing.assert_close(ours, engine, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.sum(-1), torch.ones(2))  # each sample's weights sum to one


# ---- dispatch ---------------------------------------------------------------------------------------------------


def test_auto_rule_on_cpu(monkeypatch):
    q = torch.randn(1, 2, 3, 16)
    assert A.resolve_backend(None, q) == "sdpa"
    assert A.resolve_backend(None, q, var=True) == "reference"
    assert A.resolve_backend(None, q, lse=True) == "reference"
    assert A.resolve_backend(None, q.double()) == "sdpa"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = "triton" if A.triton_available() else "sdpa"
    assert A.resolve_backend("auto", q) == expected
    assert A.resolve_backend("auto", q.double()) == "sdpa"  # the kernels are fp32/fp16/bf16 only
    if A.triton_available():
        assert A.resolve_backend("auto", q, var=True, grad=True) == "reference"  # no kernel backward through VAR
        assert A.resolve_backend("auto", q, var=True) == "triton"


def test_environment_overrides_auto_but_not_an_explicit_backend(monkeypatch):
    q = torch.randn(1, 2, 3, 16)
    monkeypatch.setenv(A.BACKEND_ENV_VAR, "reference")
    assert A.resolve_backend(None, q) == "reference"
    assert A.resolve_backend("sdpa", q) == "sdpa"
    monkeypatch.setenv(A.BACKEND_ENV_VAR, "bogus")
    with pytest.raises(BackendUnavailableError, match=A.BACKEND_ENV_VAR):
        A.resolve_backend(None, q)


def test_explicit_backend_that_cannot_run_is_refused(monkeypatch):
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(BackendUnavailableError, match="choose one of"):
        A.resolve_backend("flash", q)
    with pytest.raises(BackendUnavailableError, match="no VAR"):
        A.resolve_backend("sdpa", q, var=True)
    with pytest.raises(BackendUnavailableError, match="no lse"):
        A.resolve_backend("sdpa", q, lse=True)
    monkeypatch.setattr(A, "triton_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="pip install triton"):
        A.resolve_backend("triton", q)


@pytest.mark.skipif(not A.triton_available(), reason="needs triton")
def test_triton_refusals(monkeypatch):
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        A.resolve_backend("triton", q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="float64"):
        A.resolve_backend("triton", q.double())
    with pytest.raises(BackendUnavailableError, match="no backward through VAR"):
        A.resolve_backend("triton", q, var=True, grad=True)


def test_sdpa_backend_equals_the_reference_with_gradients():
    q, k = _engine_case()
    meta = _as_op_args(q, k)
    ins = [torch.randn(2, 4, 8, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)]
    results = []
    for backend in ("sdpa", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in ins]
        out = masked_attention(*leaves, window=5, backend=backend, **meta)
        out.backward(torch.ones_like(out))
        assert all(torch.isfinite(t.grad).all() for t in leaves)
        results.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_taps_dispatch_and_bad_inputs():
    q, k = _engine_case()
    meta = _as_op_args(q, k)
    qq, kk = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 9, 16)
    w = torch.full((2, 8), 1 / 8)
    for backend in ("auto", "sdpa", "reference"):
        torch.testing.assert_close(attention_taps(qq, kk, w, backend=backend, **meta),
                                   attention_taps_reference(qq, kk, w, **meta))
    with pytest.raises(InputLayoutError, match="weights"):
        attention_taps(qq, kk, w[:, :3], **meta)
    with pytest.raises(InputLayoutError, match="lse"):
        attention_taps(qq, kk, w, lse=torch.zeros(2, 4, 3), **meta)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(k=torch.randn(2, 3, 9, 16)), "multiple"),
        (dict(q_pos=torch.zeros(2, 7, dtype=torch.long)), "q_pos"),
        (dict(k_pos=torch.zeros(2, 9)), "integer"),
        (dict(k_valid=torch.ones(2, 9, dtype=torch.long)), "bool"),
        (dict(q_span_end=None), "both"),
        (dict(window=0), "window"),
        (dict(var=VARSpec(sink=torch.zeros(2, 9, dtype=torch.bool), image=torch.zeros(2, 9, dtype=torch.bool),
                          query=torch.zeros(2, 8, dtype=torch.bool), p=1.5)), "var.p"),
    ],
)
def test_bad_inputs_raise_input_layout_error(change, match):
    q, k = _engine_case()
    args = dict(q=torch.randn(2, 4, 8, 16), k=torch.randn(2, 2, 9, 16), v=torch.randn(2, 2, 9, 16),
                **_as_op_args(q, k))
    args.update(change)
    if "k" in change:
        args["v"] = change["k"]
    with pytest.raises(InputLayoutError, match=match):
        masked_attention(**args)
