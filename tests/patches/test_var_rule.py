"""VAR's rule on probabilities and its sink score, by hand and as properties; config validation."""

import pytest
import torch
from hf_kan.patches import PatchConfig, VARConfig
from hf_kan.patches.engine.compute import explicit_attention
from hf_kan.patches.var.runtime import redistribute, sink_scores

from hf_kan.errors import HFKanConfigError

# keys:         BOS (text sink), text, image (sink), image, image, text
SINK = torch.tensor([True, False, True, False, False, False])
IMAGE = torch.tensor([False, False, True, True, True, False])
ROWS = torch.tensor(
    [
        [0.30, 0.05, 0.10, 0.30, 0.15, 0.10],  # S = 0.55, A = 0.45, r = 0.818 -> selected at rho = 0.5 or 0.8
        [0.10, 0.10, 0.50, 0.10, 0.10, 0.10],  # S = 0.70, A = 0.20, r = 0.286 -> fails r >= rho
        [0.60, 0.25, 0.05, 0.05, 0.00, 0.05],  # S = 0.10 < 0.2 -> fails the attention-mass floor
        [0.30, 0.05, 0.10, 0.30, 0.15, 0.10],  # same as row 0 but the query comes before the image
    ],
    dtype=torch.float64,
)
QUERY = torch.tensor([True, True, True, False])


def test_hand_computed_example():
    out, selected = redistribute(ROWS, SINK, IMAGE, QUERY, p=0.5, rho=0.8, min_image_attention=0.2)
    assert selected.tolist() == [True, False, False, False]
    # row 0: sinks keep half (0.30 -> 0.15, 0.10 -> 0.05); Omega = 0.5 * 0.40 = 0.20 goes to the non-sink image keys
    # in proportion to their attention: 0.30 + 0.20 * 0.30 / 0.45, 0.15 + 0.20 * 0.15 / 0.45.
    expected0 = torch.tensor([0.15, 0.05, 0.05, 0.30 + 0.2 * 0.30 / 0.45, 0.15 + 0.2 * 0.15 / 0.45, 0.10],
                             dtype=torch.float64)
    torch.testing.assert_close(out[0], expected0, rtol=0, atol=1e-15)
    assert abs(float(out[0].sum()) - 1.0) < 1e-15
    assert torch.equal(out[1:], ROWS[1:])  # rows failing the selection are bit-for-bit untouched


def test_rho_is_the_paper_convention():
    # r = 0.818 for row 0: selected for rho <= 0.818 only. (The authors' code compares r against 1 - rho, under
    # which rho = 0.9 would select this row; hf-kan follows the paper.)
    _, sel = redistribute(ROWS[:1], SINK, IMAGE, QUERY[:1], p=0.5, rho=0.9, min_image_attention=0.2)
    assert not sel.any()
    _, sel = redistribute(ROWS[:1], SINK, IMAGE, QUERY[:1], p=0.5, rho=0.81, min_image_attention=0.2)
    assert sel.all()
    # the mass floor: S = 0.55 passes 0.5 but not 0.6
    _, sel = redistribute(ROWS[:1], SINK, IMAGE, QUERY[:1], p=0.5, rho=0.5, min_image_attention=0.6)
    assert not sel.any()


def _random_case(seed, b=2, h=3, t=7, s=11):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(b, h, t, s, generator=g, dtype=torch.float64), -1)
    image = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    image[..., 2:8] = True
    sink = torch.rand(b, 1, 1, s, generator=g) < 0.3
    sink[..., 0] = True
    query = torch.rand(b, 1, t, generator=g) < 0.8
    return probs, sink, image, query


@pytest.mark.parametrize("seed", range(4))
def test_row_sums_preserved_and_unselected_rows_untouched(seed):
    probs, sink, image, query = _random_case(seed)
    out, sel = redistribute(probs, sink, image, query, p=0.3, rho=0.3, min_image_attention=0.2)
    assert sel.any() and (~sel).any()
    torch.testing.assert_close(out.sum(-1), probs.sum(-1), rtol=0, atol=1e-13)
    assert torch.equal(out[~sel], probs[~sel])
    changed = out[sel]
    assert (changed - probs[sel]).abs().amax() > 1e-3
    # on selected rows: sinks scaled by p exactly, text non-sinks unchanged, non-sink image keys only gain
    s, im = sink.expand_as(probs)[sel], image.expand_as(probs)[sel]
    torch.testing.assert_close(changed[s], 0.3 * probs[sel][s], rtol=0, atol=1e-15)
    assert torch.equal(changed[~s & ~im], probs[sel][~s & ~im])
    assert (changed[~s & im] >= probs[sel][~s & im]).all()


def test_p_one_is_the_identity():
    probs, sink, image, query = _random_case(7)
    out, sel = redistribute(probs, sink, image, query, p=1.0, rho=0.3, min_image_attention=0.2)
    assert sel.any()
    assert torch.equal(out, probs)


def test_sink_score_by_hand():
    x = torch.tensor([[3.0, -4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # RMS 2.5 and 1
    torch.testing.assert_close(sink_scores(x, [0]), torch.tensor([1.2, 1.0]))
    torch.testing.assert_close(sink_scores(x, [0, 1]), torch.tensor([1.6, 1.0]))
    torch.testing.assert_close(sink_scores(x.to(torch.bfloat16)[None], [1]), torch.tensor([[1.6, 1.0]]))


@pytest.mark.parametrize(
    "options, match",
    [
        ({}, "sink_dims"),
        ({"sink_dims": []}, "empty"),
        ({"sink_dims": 5}, "list of ints"),
        ({"sink_dims": [1, -2]}, "non-negative"),
        ({"sink_dims": [1, 1]}, "duplicates"),
        ({"sink_dims": [1], "p": 1.5}, r"var.p must lie in \[0.0, 1.0\]"),
        ({"sink_dims": [1], "rho": -0.1}, "var.rho"),
        ({"sink_dims": [1], "tau": 0}, "var.tau"),
        ({"sink_dims": [1], "min_image_attention": "x"}, "number"),
        ({"sink_dims": [1], "layers": [2, "3"]}, "layers"),
        ({"sink_dims": [1], "modalities": ["audio"]}, "modalities"),
        ({"sink_dims": [1], "q": 1}, "unknown option"),
    ],
)
def test_invalid_var_config(options, match):
    with pytest.raises(HFKanConfigError, match=match):
        PatchConfig.from_dict({"var": options})


def test_var_config_round_trip():
    cfg = PatchConfig(var=VARConfig(sink_dims=[2533, 1415], layers=[5, 2, 3], rho=0.5))
    assert cfg.var.layers == (2, 3, 5)
    data = cfg.to_dict()
    assert data["var"]["sink_dims"] == [2533, 1415] and data["var"]["tau"] == 20.0 and data["var"]["p"] == 0.6
    assert PatchConfig.from_dict(data) == cfg and cfg.active == ("var",) and not cfg.changes_mask


@pytest.mark.parametrize("first_row", [0, 13, 37])
def test_explicit_attention_runs_rows_before_first_row_on_sdpa(first_row):
    """Rows before ``first_row`` get plain attention (no transform), later rows the transformed probabilities; checked
    against a float64 reference, with GQA, a padding-style mask and chunks that do not divide the rows."""
    torch.manual_seed(0)

    class Mod:
        num_key_value_groups = 2

    q, k, v = torch.randn(2, 4, 37, 8), torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    mask = (torch.rand(2, 1, 37, 37) > 0.3) | torch.eye(37, dtype=torch.bool)
    boost = torch.rand(37, dtype=torch.float64) + 0.5

    def transform(p, rows):  # reweight keys, renormalise (changes every row)
        w = p * boost.to(p.dtype)
        return w / w.sum(-1, keepdim=True)

    out = explicit_attention(Mod(), q, k, v, mask, 0.35, transform, chunk_size=8, first_row=first_row)
    kk, vv = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    probs = torch.softmax((q.double() @ kk.transpose(-1, -2) * 0.35).masked_fill(~mask, float("-inf")), -1)
    probs[:, :, first_row:] = transform(probs[:, :, first_row:], None)
    ref = (probs @ vv).transpose(1, 2)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
