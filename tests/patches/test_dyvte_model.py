"""DyVTE (dynamic visual-token exit) on the four families: untrained routers never exit, forced exit == masking
visual keys after the exit layer (an independent sdpa reference), routers saved and restored with the model,
efficiency accounting, config errors (never-exit == sdpa, padded batches with per-sample exits, cached decoding,
beam search and composition with pruning: ``test_invariants.py``).

Models have 3 decoder layers, so an exit after layer 0 or 1 leaves later layers without visual tokens."""

import pytest
import torch
import vlm_models as V
from hf_kan.patches.dyvte.routers import routers_of
from hf_kan.patches.dyvte.runtime import VisualKeyMask
from hf_kan.patches.engine import extra_runtime
from transformers import PreTrainedModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError, InputLayoutError

LAYERS = 3
PROMPTS = [V.standard_prompt(1, before=1), V.standard_prompt(1, before=5, after=4)]

model_for = V.module_model_cache(LAYERS)


def dyvte(family, **options):
    model = model_for(family)
    P.apply(model, mma=False, dyvte=False)
    P.apply(model, dyvte={"router_hidden": 16, **options})
    return model


def randomize_routers(model, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routers_of(model).parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def visual_masked_reference(family, inputs, exit_layer):
    """Logits of the unpatched sdpa model where, in layers > ``exit_layer[b]``, sample ``b``'s queries see no visual
    key (each query keeps its own key); ``-1`` = no exit. Visual keys are found from ``input_ids``."""
    ref = model_for(family, "sdpa")
    am = inputs["attention_mask"].bool()
    t = am.shape[1]
    eye = torch.eye(t, dtype=torch.bool)[None]
    base = (torch.ones(t, t, dtype=torch.bool).tril()[None] & am[:, None, :]) | eye
    text_key = inputs["input_ids"] != V.IMAGE
    late = (base & text_key[:, None, :]) | eye
    handles = []
    for i, layer in enumerate(ref.model.language_model.layers):
        use_late = torch.tensor([0 <= int(e) < i for e in exit_layer])[:, None, None]
        mask = torch.where(use_late, late, base)[:, None]
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, m=mask: (args, {**kwargs, "attention_mask": m}), with_kwargs=True))
    try:
        with torch.no_grad():
            return ref(**inputs).logits
    finally:
        for h in handles:
            h.remove()


def rows_after_exit(out):
    state = out.hf_kan_state if hasattr(out, "hf_kan_state") else out.cache.hf_kan_prefill_state
    return state.row_positions(LAYERS - 1)


# --------------------------------------------------------------------------------------------- equivalences


def test_untrained_routers_say_one_half_and_keep_everywhere_routers_never_exit():
    """Untrained routers (zero last layer) give p(exit) = 0.5 exactly, which never exits (the rule is strict >);
    trained-looking routers that say "keep" everywhere never exit either (never-exit == sdpa on every family:
    ``test_invariants.py``)."""
    family = "llava"
    model = dyvte(family)
    inputs = V.make_inputs(family, PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs)
        ref = model_for(family, "sdpa")(**inputs).logits
    p = out.hf_kan_state.scratch["dyvte"]["p_exit"]
    assert sorted(p) == [0, 1] and all(torch.equal(v, torch.full((2,), 0.5)) for v in p.values())
    randomize_routers(model)
    with torch.no_grad():
        for key in ("0", "1"):
            fc2 = routers_of(model).routers[key].fc2.weight
            fc2[1].fill_(0.0)
            fc2[0].copy_(fc2[0].abs() + 1)
    P.apply(model, dyvte={"threshold": 0.9})
    with torch.no_grad():
        out = model(**inputs)
    assert P.exit_layers(out).tolist() == [-1, -1]
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", V.FAMILIES)
@pytest.mark.parametrize("layer", [0, 1])
def test_forced_exit_equals_masking_visual_keys_after_the_layer(family, layer):
    model = dyvte(family, force_exit_layer=layer)
    inputs = V.make_inputs(family, PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs)
    exit_layer = torch.full((2,), layer)
    expected = visual_masked_reference(family, inputs, exit_layer)
    assert P.exit_layers(out).tolist() == [layer, layer]
    rows = rows_after_exit(out)
    ids = inputs["input_ids"]
    for b in range(2):
        pos = rows[b][rows[b] >= 0]
        text = (inputs["attention_mask"][b].bool() & (ids[b] != V.IMAGE)).nonzero().flatten()
        assert pos.tolist() == text.tolist()  # exactly the text tokens are left, at their original positions
        torch.testing.assert_close(out.logits[b, -pos.numel():], expected[b, pos], rtol=1e-5, atol=1e-5)
    # the exit mattered, and the in-backend masked simulation (used for labels) agrees too
    with torch.no_grad():
        plain = model_for(family, "sdpa")(**inputs).logits
        P.apply(model, dyvte=False)
        with extra_runtime(model, VisualKeyMask(exit_layer)):
            masked = model(**inputs).logits
    assert (plain[:, -1] - expected[:, -1]).abs().max() > 1e-4
    text = (ids != V.IMAGE) & inputs["attention_mask"].bool()
    torch.testing.assert_close(masked[text], expected[text], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_routers_round_trip_through_save_and_from_pretrained(family, tmp_path):
    model = dyvte(family, threshold=0.3)
    randomize_routers(model, seed=2)
    inputs = V.make_inputs(family, PROMPTS, "left")
    with torch.no_grad():
        before = model(**inputs)
    model.save_pretrained(tmp_path)
    loaded = V.model_class(family).from_pretrained(tmp_path, attn_implementation={"text_config": "hf_kan"})
    assert routers_of(loaded) is None  # Transformers skips the router keys ...
    P.apply(loaded)  # ... and apply restores them from the checkpoint
    assert P.status(loaded)["patches"]["dyvte"]["threshold"] == 0.3
    for (ka, a), (kb, b) in zip(routers_of(model).state_dict().items(), routers_of(loaded).state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    with torch.no_grad():
        after = loaded.eval()(**inputs)
    assert torch.equal(P.exit_layers(after), P.exit_layers(before))
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=1e-6)
    with CaptureLogger(hf_logging.get_logger("transformers.modeling_utils")) as report:
        again = P.from_pretrained(V.model_class(family), tmp_path)
    assert "LOAD REPORT" not in report.out  # the routers are restored by apply, not unexpected
    assert PreTrainedModel._keys_to_ignore_on_load_unexpected is None  # the pattern was set for that load only
    assert torch.equal(routers_of(again).routers["1"].fc1.weight, routers_of(model).routers["1"].fc1.weight)


def test_changing_layers_keeps_trained_routers_and_adds_untrained_ones():
    model = V.build("llava", "hf_kan", num_layers=LAYERS)
    P.apply(model, dyvte={"router_hidden": 16, "layers": [1]})
    assert routers_of(model).layers == (1,)
    randomize_routers(model, seed=3)
    w = routers_of(model).routers["1"].fc1.weight.clone()
    P.apply(model, dyvte={"layers": [0, 1]})
    r = routers_of(model)
    assert r.layers == (0, 1) and torch.equal(r.routers["1"].fc1.weight, w)
    assert not bool(r.routers["0"].fc2.weight.any())  # the new router starts at "never exit"


# --------------------------------------------------------------------------------------------- accounting, errors


def test_efficiency_report_reflects_the_exit():
    family = "llava"
    model = dyvte(family)
    randomize_routers(model, seed=1)
    inputs = V.make_inputs(family, PROMPTS, "left")
    P.apply(model, dyvte={"force_exit_layer": 0})
    with torch.no_grad():
        out = model(**inputs)
        P.apply(model, dyvte=False)
        base = model(**inputs)
    rep, ref = P.efficiency_report(model, out), P.efficiency_report(model, base)
    am, ids = inputs["attention_mask"].bool(), inputs["input_ids"]
    n_all, n_text = int(am.sum()), int((am & (ids != V.IMAGE)).sum())
    assert rep.tokens_per_layer == [n_all, n_text, n_text] and ref.tokens_per_layer == [n_all] * 3
    assert rep.kv_slots_per_layer[1] < ref.kv_slots_per_layer[1]
    assert rep.kv_cache_bytes < ref.kv_cache_bytes and 0.3 < rep.flops_ratio(ref) < 0.7


def test_config_errors_say_what_to_fix():
    model = model_for("llava")
    with pytest.raises(HFKanConfigError, match="threshold"):
        P.apply(model, dyvte={"threshold": 1.5})
    with pytest.raises(HFKanConfigError, match="cannot exit"):
        P.apply(model, dyvte={"layers": [2]})
    with pytest.raises(HFKanConfigError, match="force_exit_layer"):
        P.apply(model, dyvte={"layers": [0], "force_exit_layer": 1})
    with pytest.raises(HFKanConfigError, match="unknown option"):
        P.apply(model, dyvte={"thresold": 0.5})
    with pytest.raises(HFKanConfigError):
        P.PatchConfig.from_dict({"dyvte": {"router_hidden": 0}})
    cfg = P.PatchConfig.from_dict({"dyvte": {"threshold": 0.7, "layers": [1, 0]}})
    assert cfg.dyvte.layers == (0, 1) and P.PatchConfig.from_dict(cfg.to_dict()) == cfg


def test_labels_are_refused_when_routers_can_exit():
    model = dyvte("llava")
    inputs = V.make_inputs("llava", PROMPTS, "left")
    with pytest.raises(InputLayoutError, match="labels"):
        model(**inputs, labels=inputs["input_ids"])

