"""Visual-token pruning (FastV / PDrop) on the token-dropping mechanism, over the four families: keep sets against
eager attention, M-RoPE positions of kept tokens, PDrop stages, config and errors (keep ratio 1 == off, padded
batches, cached decoding, beam search and composition with MMA, VAR and DyVTE: ``test_invariants.py``).

Models have 3 decoder layers so that K = 2 leaves layers before and after the drop point."""

import pytest
import torch
import vlm_models as V
from hf_kan.patches.engine.dropping import keep_index
from hf_kan.patches.prune.config import PruneConfig
from hf_kan.patches.prune.runtime import keep_counts

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError, InputLayoutError

LAYERS = 3
K = 2
PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]

model_for = V.module_model_cache(LAYERS)


def pruned(family, **prune):
    model = model_for(family)
    P.apply(model, mma=False, prune={"layers": [K], "keep_ratios": [0.5], **prune})
    return model


def kept_positions(out, stage=-1):
    state = out.hf_kan_state if hasattr(out, "hf_kan_state") else out.cache.hf_kan_prefill_state
    kept = state.scratch["prune"]["kept"]
    return kept[sorted(kept)[stage]]


# ------------------------------------------------------------------------------------------- the mechanism


def test_keep_index_left_fills_and_keeps_order():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    assert keep_index(keep).tolist() == [[0, 2, 3], [-1, -1, 1]]
    assert keep_counts(torch.tensor([576, 7, 3]), 0.5).tolist() == [288, 4, 2]


@pytest.mark.parametrize("family", V.FAMILIES)
@pytest.mark.parametrize("scorer, score_layer", [("fastv", "previous"), ("fastv_text_mean", "previous"),
                                                 ("pdrop", "own")])
def test_keep_sets_equal_eager_reference(family, scorer, score_layer):
    """Scores recomputed for the voter rows pick the same tokens as full eager attention weights (head average; last
    prompt token, or the mean over the text after the image): layer K-1's attention for ``score_layer="previous"``,
    layer K's own attention for ``"own"`` (the first stage's layer K sees the unpruned hidden states)."""
    inputs = V.make_inputs(family, PROMPTS, "left")
    layer = K - 1 if score_layer == "previous" else K
    with torch.no_grad():
        out = pruned(family, scorer=scorer, score_layer=score_layer)(**inputs)
        att = model_for(family, "eager")(**inputs, output_attentions=True).attentions[layer].mean(1)  # (B, T, T)
    kept = kept_positions(out)
    ids = inputs["input_ids"]
    for b in range(2):
        visual = (ids[b] == V.IMAGE).nonzero().flatten()
        if scorer in ("fastv", "pdrop"):
            score = att[b, -1]
        else:
            first = int(visual[0])
            text = [i for i in range(first, ids.shape[1]) if int(ids[b, i]) not in (V.IMAGE, V.PAD)]
            score = att[b, text].mean(0)
        k = int(keep_counts(torch.tensor(visual.numel()), 0.5))
        expected = visual[score[visual].topk(k).indices].sort().values
        got = kept[b][(kept[b] >= 0)]
        got = got[torch.isin(got, visual)]
        assert got.tolist() == expected.tolist()
        assert k < visual.numel()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_mrope_positions_of_kept_tokens_unchanged(family):
    """cos/sin entering layer K of the pruned model are the unpatched model's, at the kept columns (M-RoPE rows
    t/h/w merged into them), so image tokens keep their 3-D positions."""
    inputs = V.make_inputs(family, PROMPTS, "left")
    seen = {}

    def grab(name):
        def hook(mod, args, kwargs):
            seen[name] = [t.clone() for t in kwargs["position_embeddings"]]
        return hook

    model, ref = pruned(family), model_for(family, "sdpa")
    handles = [model.model.language_model.layers[K].self_attn.register_forward_pre_hook(grab("pruned"),
                                                                                          with_kwargs=True),
               ref.model.language_model.layers[K].self_attn.register_forward_pre_hook(grab("ref"), with_kwargs=True)]
    try:
        with torch.no_grad():
            out = model(**inputs)
            ref(**inputs)
    finally:
        for h in handles:
            h.remove()
    kept = kept_positions(out)
    assert seen["pruned"][0].shape[1] == kept.shape[1] < inputs["input_ids"].shape[1]
    for b in range(2):
        cols = kept[b][kept[b] >= 0]
        n = cols.numel()
        for got, want in zip(seen["pruned"], seen["ref"]):
            torch.testing.assert_close(got[b, -n:], want[b, cols], rtol=0, atol=0)
    vis = inputs["input_ids"][0] == V.IMAGE
    assert not torch.equal(seen["ref"][0][0, vis][0], seen["ref"][0][0, vis][1])  # positions differ per token


def test_pdrop_stages_shrink_in_steps():
    model = model_for("llava_next")
    P.apply(model, mma=False, prune={"method": "pdrop", "layers": [1, 2], "keep_ratios": [0.5, 0.25]})
    inputs = V.make_inputs("llava_next", PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs)
    ids = inputs["input_ids"]
    kept = out.hf_kan_state.scratch["prune"]["kept"]
    for b in range(2):
        n_vis = int((ids[b] == V.IMAGE).sum())
        n_text = int(inputs["attention_mask"][b].sum()) - n_vis
        for stage, ratio in enumerate([0.5, 0.25]):
            k = kept[stage][b]
            assert int((k >= 0).sum()) == n_text + int(keep_counts(torch.tensor(n_vis), ratio))
        assert set(kept[1][b][kept[1][b] >= 0].tolist()) <= set(kept[0][b][kept[0][b] >= 0].tolist())
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [ids.shape[1], kept[0].shape[1], kept[1].shape[1]]


# ------------------------------------------------------------------------------------------- config and errors


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"layers": [0]}, ">= 1"),
        ({"layers": [3, 2], "keep_ratios": [0.5, 0.2]}, "increasing"),
        ({"layers": [2], "keep_ratios": [0.5, 0.2]}, "one ratio per stage"),
        ({"keep_ratios": [1.5]}, r"\(0, 1\]"),
        ({"layers": [1, 2], "keep_ratios": [0.2, 0.5]}, "non-increasing"),
        ({"scorer": "random"}, "unknown"),
        ({"trend": float("nan")}, "finite"),
        ({"padding_threshold": 1.0}, "padding_threshold"),
        ({"debias_stages": [1]}, "debias_stages"),
        ({"score_layer": "next"}, "score_layer"),
        ({"trend": -0.01, "multiplier_b": 0.01}, "give only one"),
        ({"multiplier_b": float("inf")}, "multiplier_b"),
        ({"debias": {"b": 0.01}}, "unknown debias"),
        ({"debias": {"trend": -0.01}, "trend": -0.02}, "given twice"),
    ],
)
def test_invalid_prune_config(bad, match):
    with pytest.raises(HFKanConfigError, match=match):
        P.PatchConfig.from_dict({"prune": {"layers": [2], "keep_ratios": [0.5], **bad}})


def test_presets_apply_errors_and_round_trip(tmp_path):
    assert PruneConfig.preset("pdrop").keep_ratios == (0.5, 0.25, 0.125)
    model = V.build("llava", num_layers=LAYERS)
    with pytest.raises(HFKanConfigError, match="decoder layers"):
        P.apply(model, prune="pdrop")  # layers 8/16/24 on a 3-layer model
    with pytest.raises(HFKanConfigError, match="prune must be"):
        P.apply(model, prune=3)
    cfg = P.apply(model, prune={"method": "fastv", "layers": [2], "debias": True, "trend": -0.01})
    assert cfg.prune.method == "fastv" and cfg.prune.debias and P.status(model)["active"] == ["prune"]
    inputs = V.make_inputs("llava", PROMPTS, "left")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = P.from_pretrained(V.model_class("llava"), tmp_path)
    assert P.status(loaded)["patches"]["prune"] == cfg.prune.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(InputLayoutError, match="labels"):
        loaded(**inputs, labels=inputs["input_ids"])
