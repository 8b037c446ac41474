"""Visual-token pruning (FastV / PDrop) on the token-dropping mechanism, table-driven over the four families.

Models have 3 decoder layers so that K = 2 leaves layers before and after the drop point."""

import pytest
import torch
import vlm_models as V
from hf_kan.patches.engine import PatchRuntime
from hf_kan.patches.engine.dropping import keep_index
from hf_kan.patches.prune.config import PruneConfig
from hf_kan.patches.prune.runtime import keep_counts

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError, InputLayoutError

LAYERS = 3
K = 2
PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]
MMA = {"assistant_token_ids": [V.ASSISTANT]}
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=V.SUPPRESS, return_dict_in_generate=True,
           output_logits=True)

model_for = V.module_model_cache(LAYERS)


def pruned(family, mma=False, **prune):
    model = model_for(family)
    P.apply(model, mma=MMA if mma else False, prune={"layers": [K], "keep_ratios": [0.5], **prune})
    return model


def kept_positions(out, stage=-1):
    state = out.hf_kan_state if hasattr(out, "hf_kan_state") else out.cache.hf_kan_prefill_state
    kept = state.scratch["prune"]["kept"]
    return kept[sorted(kept)[stage]]


def masked_reference(family, inputs, kept, prompt_len, from_layer=K):
    """Logits of the unpatched (sdpa) model over ``inputs`` where, in layers >= ``from_layer``, every prompt key not
    in ``kept`` (per sample, original positions) is masked out: what pruning must compute for the kept rows."""
    ref = model_for(family, "sdpa")
    am = inputs["attention_mask"].bool()
    t = am.shape[1]
    eye = torch.eye(t, dtype=torch.bool)[None]
    base = (torch.ones(t, t, dtype=torch.bool).tril()[None] & am[:, None, :]) | eye
    keep_key = torch.arange(t)[None].expand(am.shape[0], -1) >= prompt_len  # generated tokens are never dropped
    for b in range(am.shape[0]):
        keep_key[b, kept[b][kept[b] >= 0]] = True
    late = (base & keep_key[:, None, :]) | eye
    handles = []
    for i, layer in enumerate(ref.model.language_model.layers):
        mask = (late if i >= from_layer else base)[:, None]
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, m=mask: (args, {**kwargs, "attention_mask": m}), with_kwargs=True))
    try:
        with torch.no_grad():
            return ref(**inputs).logits
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------- the mechanism


def test_keep_index_left_fills_and_keeps_order():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    assert keep_index(keep).tolist() == [[0, 2, 3], [-1, -1, 1]]
    assert keep_counts(torch.tensor([576, 7, 3]), 0.5).tolist() == [288, 4, 2]


@pytest.mark.parametrize("family", V.FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_keep_ratio_one_equals_unpatched(family, side):
    inputs = V.make_inputs(family, PROMPTS, side)
    with torch.no_grad():
        ref = model_for(family, "sdpa")(**inputs).logits
        out = pruned(family, keep_ratios=[1.0])(**inputs)
    kept = kept_positions(out)
    for b in range(2):
        pos = kept[b][kept[b] >= 0]
        assert pos.tolist() == inputs["attention_mask"][b].nonzero().flatten().tolist()  # every real token kept
        torch.testing.assert_close(out.logits[b, -pos.numel():], ref[b, pos], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", V.FAMILIES)
@pytest.mark.parametrize("scorer", ["fastv", "fastv_text_mean"])
def test_keep_sets_equal_eager_reference(family, scorer):
    """Scores recomputed for one query row from layer K-1's q/k pick the same tokens as full eager attention weights
    (head average; last prompt token, or the mean over the text after the image)."""
    inputs = V.make_inputs(family, PROMPTS, "left")
    with torch.no_grad():
        out = pruned(family, scorer=scorer)(**inputs)
        att = model_for(family, "eager")(**inputs, output_attentions=True).attentions[K - 1].mean(1)  # (B, T, T)
    kept = kept_positions(out)
    ids = inputs["input_ids"]
    for b in range(2):
        visual = (ids[b] == V.IMAGE).nonzero().flatten()
        if scorer == "fastv":
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


@pytest.mark.parametrize("family", V.FAMILIES)
def test_pruned_prefill_then_cached_decoding_equals_full_forward(family):
    model = pruned(family)
    inputs = V.make_inputs(family, PROMPTS, "left")
    gen = model.generate(**inputs, **GEN)
    kept = kept_positions(gen)
    cache = gen.cache
    prompt_len = inputs["input_ids"].shape[1]
    widths = [layer.keys.shape[2] for layer in cache.layers]
    assert widths[0] == widths[1] == prompt_len + 3 and widths[2] == kept.shape[1] + 3  # layers >= K hold kept only
    seq = gen.sequences[:, :-1]
    full = dict(inputs, input_ids=seq)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, seq.shape[1] - prompt_len,
                                                                             dtype=torch.long)], 1)
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = (seq == V.IMAGE).int()
    expected = masked_reference(family, full, kept, prompt_len)
    for step, logits in enumerate(gen.logits):
        torch.testing.assert_close(logits, expected[:, prompt_len - 1 + step], rtol=1e-4, atol=1e-4)
    # and the pruned cache really mattered: unmasked logits differ
    with torch.no_grad():
        unmasked = model_for(family, "sdpa")(**full).logits
    assert (unmasked[:, prompt_len - 1] - expected[:, prompt_len - 1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", V.FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(family, side):
    model = pruned(family)
    inputs = V.make_inputs(family, PROMPTS, side)
    with torch.no_grad():
        batch = model(**inputs)
        for b in range(2):
            alone = model(**V.sample_inputs(family, inputs, b))
            offset = int(inputs["attention_mask"][b].nonzero()[0])  # sample's first column in the batch
            kb = kept_positions(batch)[b]
            ka = kept_positions(alone)[0]
            assert (kb[kb >= 0] - offset).tolist() == ka.tolist()
            torch.testing.assert_close(batch.logits[b, -ka.numel():], alone.logits[0], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("family", V.FAMILIES)
def test_mma_and_pruning_decode_correctly(family):
    """MMA + pruning: cached generate equals a full forward of the MMA model whose layers >= K see only the kept
    keys (a test runtime narrows the mask)."""
    model = pruned(family, mma=True)
    inputs = V.make_inputs(family, PROMPTS, "left")
    gen = model.generate(**inputs, **GEN)
    kept = kept_positions(gen)
    prompt_len = inputs["input_ids"].shape[1]
    seq = gen.sequences[:, :-1]
    full = dict(inputs, input_ids=seq)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, seq.shape[1] - prompt_len,
                                                                             dtype=torch.long)], 1)
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = (seq == V.IMAGE).int()

    class KeepOnly(PatchRuntime):
        layer_dependent_mask = True

        def changes_mask(self, state):
            return True

        def mask_rule(self, state, layer_idx, q, k, allowed):
            if layer_idx < K:
                return allowed
            ok = torch.zeros_like(k.valid)
            for b in range(ok.shape[0]):
                ok[b] = torch.isin(k.position[b], kept[b][kept[b] >= 0]) | (k.position[b] >= prompt_len)
            return allowed & ok[:, None, :] | torch.eye(allowed.shape[1], allowed.shape[2], dtype=torch.bool)

    P.apply(model, prune=False)
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: kwargs["hf_kan_state"].add_runtime(KeepOnly(None)), with_kwargs=True)
    try:
        with torch.no_grad():
            expected = model(**full).logits
    finally:
        handle.remove()
    for step, logits in enumerate(gen.logits):
        torch.testing.assert_close(logits, expected[:, prompt_len - 1 + step], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        mma_only = model(**full).logits
    assert (mma_only[:, prompt_len - 1] - expected[:, prompt_len - 1]).abs().max() > 1e-4


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
