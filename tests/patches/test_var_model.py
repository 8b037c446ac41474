"""VAR on tiny random models of the four families: what changes and what must not, a layer holding a subset of
positions, the sink table kept with the cache, the sink-dimension finder, CLI and picture (p = 1 == off, padded
batches, cached decoding, beam search and composition with MMA and pruning: ``test_invariants.py``).

The tiny models get "massive activations" planted in the BOS embedding (dims 3 and 17, ``V.plant_sink_dims``), so
BOS is a text sink in every layer; with tau = 1.5 some image tokens are sinks too (hidden size 32 caps phi at
sqrt(32 / 2) = 4, so the paper's tau = 20 is unreachable here).
"""

import pytest
import torch
import vlm_models as V
from hf_kan.patches.engine.runtime import PatchRuntime
from hf_kan.patches.var.config import default_var_layers
from hf_kan.patches.var.picture import assemble, plot_var, record_var

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError, UnsupportedModelError

DIMS = [3, 17]
VAR = {"sink_dims": DIMS, "tau": 1.5, "rho": 0.5, "layers": [1, 2, 3]}
PROMPTS = [V.standard_prompt(1, before=2, after=6), V.standard_prompt(1, before=4)]
GEN = dict(do_sample=False, suppress_tokens=V.SUPPRESS, return_dict_in_generate=True, output_logits=True)
model_for = V.module_model_cache(4, prepare=V.plant_sink_dims)
plant = V.plant_sink_dims


def var_model(family, **options):
    """The module's 4-layer planted model of ``family`` with VAR set to ``VAR | options`` (MMA off)."""
    model = model_for(family)
    P.apply(model, mma=False, var={**VAR, **options})
    return model


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def n_selected(trace, layer):
    return int(sum(int(s.sum()) for _, s in trace["layers"][layer]["selected"]))


@pytest.mark.parametrize("family", V.FAMILIES)
def test_var_changes_only_queries_after_the_image_and_preserves_row_sums(family):
    model = var_model(family)
    inputs = V.make_inputs(family, PROMPTS, "left")
    with record_var(model, keep_probs_layer=2) as trace, torch.no_grad():
        on = model(**inputs).logits
    state = trace["state"]
    before, after = assemble(trace, 2, "before"), assemble(trace, 2, "after")
    selected = assemble(trace, 2, "selected")  # (B, H, T)
    valid = inputs["attention_mask"].bool()
    explicit = ~before.isnan().any(-1)  # rows from the first query VAR may change (earlier ones use SDPA)
    assert explicit.any() and not explicit.all()
    rows = explicit & valid[:, None]
    torch.testing.assert_close(after.sum(-1)[rows], torch.ones(int(rows.sum())))
    assert selected.any() and not selected[~explicit].any()
    before, after = before.nan_to_num(), after.nan_to_num()
    assert torch.equal(after[~selected], before[~selected])  # unselected rows are untouched
    assert (after[selected] - before[selected]).abs().amax() > 1e-3
    lay = state.layout
    last_image = torch.where(lay.visual, lay.position, -1).amax(-1)
    early = lay.position <= last_image[:, None]
    assert not selected.permute(0, 2, 1)[early].any()  # never a query at or before the image
    assert any(bool((s & lay.visual).any()) for s in trace["sinks"].values())  # visual sinks exist
    assert all(bool(s[lay.position == (inputs["input_ids"] == V.BOS).int().argmax(-1)[:, None]].all())
               for s in trace["sinks"].values())  # BOS (planted massive activation) is a sink in every VAR layer

    P.apply(model, var=False)
    off = logits(model, inputs)
    torch.testing.assert_close(on[early & valid], off[early & valid], rtol=0, atol=1e-5)
    late = ~early & valid
    assert (on[late] - off[late]).abs().amax(-1).min() > 1e-4  # every query after the image changes


class _HideKeys(PatchRuntime):
    """Test runtime: hides the given original positions (per sample) from the keys of the given layers (a query
    still sees its own key, so no row is empty)."""

    name = "hide"
    layer_dependent_mask = True

    def __init__(self, layers, positions):
        super().__init__(None)
        self.layers, self.positions = set(layers), positions

    def changes_mask(self, state):
        return True

    def mask_rule(self, state, layer_idx, q, k, allowed):
        if layer_idx not in self.layers:
            return allowed
        hidden = torch.zeros_like(allowed[:, 0])
        for b, pos in enumerate(self.positions):
            hidden[b] = torch.isin(k.position[b], torch.tensor(pos, dtype=torch.long))
        return allowed & ~(hidden[:, None] & (k.position[:, None, :] != q.position[:, :, None]))


def test_var_layer_holding_a_subset_of_positions_decodes_correctly():
    """VAR layer 2's cache keeps a different subset of positions per sample (what token pruning does; the pruning
    patch itself is built separately). A decode step must equal VAR with those keys masked out of layer 2."""
    model = var_model("llava")
    inputs = V.make_inputs("llava", PROMPTS, "left")
    length = inputs["input_ids"].shape[1]
    img = [(inputs["input_ids"][b] == V.IMAGE).nonzero().flatten() for b in range(2)]
    dropped = [img[0][::2].tolist(), img[1][1:12:3].tolist()]
    with torch.no_grad():
        out = model(**inputs)
    cache = out.cache
    keep = [[p for p in range(length) if p not in d] for d in dropped]
    width = max(len(k) for k in keep)
    layer = cache.layers[2]
    held = torch.full((2, width), -1, dtype=torch.long)
    keys = torch.zeros(2, layer.keys.shape[1], width, layer.keys.shape[-1])
    values = torch.zeros_like(keys)
    for b in range(2):
        idx = torch.tensor(keep[b])
        held[b, : len(idx)] = idx
        keys[b, :, : len(idx)], values[b, :, : len(idx)] = layer.keys[b, :, idx], layer.values[b, :, idx]
    layer.keys, layer.values = keys, values
    cache.ledger.set_layer(2, held)

    token = out.logits[:, -1].argmax(-1, keepdim=True)
    step_kw = dict(input_ids=token, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1),
                   position_ids=inputs["attention_mask"].sum(-1, keepdim=True))
    with record_var(model) as trace, torch.no_grad():
        step = model(cache=cache, **step_kw).logits[:, -1]
    assert n_selected(trace, 2) > 0
    sinks_dropped = any(bool(trace["sinks"][2][b, dropped[b]].any()) for b in range(2))

    with torch.no_grad():
        full_cache, unmasked_cache = model(**inputs).cache, model(**inputs).cache
        unmasked = model(cache=unmasked_cache, **step_kw).logits[:, -1]
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: kwargs["hf_kan_state"].add_runtime(_HideKeys([2], dropped)), with_kwargs=True)
    try:
        with torch.no_grad():
            expected = model(cache=full_cache, **step_kw).logits[:, -1]
    finally:
        hook.remove()
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    assert (unmasked - expected).abs().max() > 1e-4 and sinks_dropped  # the dropped keys (sinks among them) mattered


# ----------------------------------------------------------------------------------- sink dims, apply, save


@pytest.mark.parametrize("family", V.FAMILIES)
def test_find_sink_dims_recovers_planted_dimensions(family):
    model = plant(V.build(family, num_layers=4), dims=(29, 5, 11), values=(-1.2, 0.9, 0.4))
    assert P.find_sink_dims(model) == [29, 5]
    assert P.find_sink_dims(model, num_dims=3) == [29, 5, 11]
    # from a left-padded batch of real prompts: the first real token (BOS) carries them
    inputs = V.make_inputs(family, [[V.BOS, 10, 11, 12], [V.BOS, 13]], "left")
    scores = P.sink_dim_scores(model, {k: inputs[k] for k in ("input_ids", "attention_mask")})
    assert scores.topk(2).indices.tolist() == [29, 5] and float(scores[29]) > 10 * float(scores.median())


def test_apply_var_true_calibrates_and_resolves_default_layers(tmp_path):
    model = plant(V.build("llava", num_layers=5))
    cfg = P.apply(model, var=True)
    assert cfg.var.sink_dims == (3, 17) and cfg.var.layers == default_var_layers(5) == (2, 3)
    assert cfg.var.p == 0.6 and cfg.var.tau == 20.0 and cfg.var.rho == 0.8
    assert P.status(model)["active"] == ["var"]
    P.apply(model, var={"tau": 1.5, "rho": 0.5})  # keeps the calibrated dims
    inputs = V.make_inputs("llava", PROMPTS, "left")
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = P.from_pretrained(V.model_class("llava"), tmp_path)
    assert P.status(loaded)["patches"]["var"]["sink_dims"] == [3, 17]
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-6)
    P.apply(loaded, var=False)
    assert (logits(loaded, inputs) - expected).abs().max() > 1e-4  # VAR was doing something


def test_var_errors():
    model = V.build("llava", num_layers=4)
    with pytest.raises(HFKanConfigError, match="do not exist"):
        P.apply(model, var={"sink_dims": [1], "layers": [4]})
    with pytest.raises(HFKanConfigError, match="hidden size"):
        P.apply(model, var={"sink_dims": [32]})
    with pytest.raises(HFKanConfigError, match="var must be"):
        P.apply(model, var="on")
    model = V.build("llava", num_layers=4)
    model.config.text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="hf_kan"):
        P.apply(model, var={"sink_dims": [1]})


def test_calibrate_var_cli(tmp_path, capsys):
    from hf_kan.cli import main

    plant(V.build("llava", num_layers=4), dims=(7, 21), values=(0.3, 1.1)).save_pretrained(tmp_path)
    assert main(["calibrate-var", str(tmp_path), "--save", "--rho", "0.5"]) == 0
    assert "[21, 7]" in capsys.readouterr().out
    loaded = P.from_pretrained(V.model_class("llava"), tmp_path)
    var = P.status(loaded)["patches"]["var"]
    assert var["sink_dims"] == [21, 7] and var["rho"] == 0.5 and var["layers"] == [2]


def test_plot_var_writes_the_picture(tmp_path):
    from PIL import Image

    model = var_model("llava")
    inputs = V.make_inputs("llava", PROMPTS, "left")
    image = Image.new("RGB", (64, 64), (40, 120, 200))
    maps = plot_var(model, inputs, tmp_path / "var.png", layer=3, head=1, image=image)
    with Image.open(tmp_path / "var.png") as png:
        assert png.format == "PNG" and png.size[0] > 400
    assert maps["sinks"].shape == maps["before"].shape == (V.LLAVA_GRID, V.LLAVA_GRID)
    with record_var(model) as trace, torch.no_grad():
        model(**inputs)
    img_pos = (inputs["input_ids"][0] == V.IMAGE).nonzero().flatten()
    assert torch.equal(maps["sinks"].flatten(), trace["sinks"][3][0, img_pos])
    if maps["selected"]:
        assert (maps["after"][~maps["sinks"]] >= maps["before"][~maps["sinks"]]).all()
        assert (maps["after"] - maps["before"]).abs().max() > 0
    else:
        assert torch.equal(maps["after"], maps["before"])


def test_sink_table_is_kept_with_the_cache():
    """The sink flags of every position seen are stored with the cache and follow its batch operations (beam search
    itself: ``test_invariants.py``)."""
    model = var_model("llava")
    inputs = V.make_inputs("llava", PROMPTS, "left")
    cached = model.generate(**inputs, max_new_tokens=3, **GEN)
    assert cached.cache.ledger.token_data["var_sink"].shape[:2] == (2, cached.sequences.shape[1] - 1)
    ledger = P.HFKanCache(config=model.config.text_config).ledger
    ledger.token_data["var_sink"] = torch.arange(12).reshape(2, 6, 1) % 5 == 0
    ledger.tokens = model(**inputs).cache.ledger.tokens.narrow(0, 6)
    ledger.select_batch(torch.tensor([1, 1]))
    assert ledger.token_data["var_sink"][:, :, 0].tolist() == [[False, False, False, False, True, False]] * 2
    ledger.crop(2)
    assert ledger.token_data["var_sink"].shape == (2, 4, 1)
