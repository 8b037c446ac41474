"""A patch defined in this file, registered without touching the engine: config round trip, ``apply(model,
name=...)``, its runtime hooks called, save / load, composition with a built-in patch; and the table's checks."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import vlm_models as V
from hf_kan.patches import registry
from hf_kan.patches.engine import PatchRuntime, PatchSpec
from hf_kan.patches.engine.spec import CliCommand

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError, UnsupportedModelError


@dataclass(frozen=True)
class BlindConfig:
    """Text queries of the given layers do not see image keys (a visibility patch, for the test)."""

    layers: tuple[int, ...] = (1,)

    def __post_init__(self):
        if any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise HFKanConfigError(f"blind.layers must be layer indices, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))


class BlindRuntime(PatchRuntime):
    name = "blind"
    uses_layer_hooks = True
    layer_dependent_mask = True

    def begin_forward(self, state, inputs):
        state.scratch["blind"] = {"begin": 1, "before_layer": [], "mask_rule": set()}

    def before_layer(self, state, layer_idx, hidden_states, kwargs):
        state.scratch["blind"]["before_layer"].append(layer_idx)

    def changes_mask(self, state):
        return True

    def mask_rule(self, state, layer_idx, q, k, allowed):
        state.scratch["blind"]["mask_rule"].add(layer_idx)
        if layer_idx not in self.config.layers:
            return allowed
        own = q.position[:, :, None] == k.position[:, None, :]
        hide = ~q.visual[:, :, None] & k.visual[:, None, :]
        return allowed & (~hide | own)


SPEC = PatchSpec(name="blind", config_class=BlindConfig, runtime_class=BlindRuntime, changes_visibility=True,
                 cli=(CliCommand("blind-report", "nowhere.blind", "not a real command"),))


@pytest.fixture
def blind():
    registry.register(SPEC)
    try:
        yield SPEC
    finally:
        registry.unregister("blind")


def test_a_patch_defined_here_works_end_to_end(blind, tmp_path):
    model = V.build("llava", num_layers=2)
    ref = V.build("llava", num_layers=2)
    inputs = V.make_inputs("llava", [V.standard_prompt(1), V.standard_prompt(2, before=1)], "left")
    cfg = P.apply(model, blind={"layers": [1]})
    assert cfg.blind == BlindConfig(layers=(1,)) and cfg.active == ("blind",) and cfg.changes_mask
    assert P.status(model)["patches"] == {"blind": {"layers": [1]}} and P.status(model)["hooks_attached"]
    assert P.PatchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with torch.no_grad():
        out = model(**inputs)
        expected = ref(**inputs).logits
    calls = out.hf_kan_state.scratch["blind"]
    assert calls["begin"] == 1 and calls["before_layer"] == [0, 1] and calls["mask_rule"] == {0, 1}
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    before_image = torch.arange(ids.shape[1])[None] < (ids == V.IMAGE).int().argmax(-1, keepdim=True)
    # text before the image never saw it: unchanged; text after the image changes in layer 1
    torch.testing.assert_close(out.logits[before_image & valid], expected[before_image & valid], rtol=0, atol=1e-6)
    after = ~before_image & valid & (ids != V.IMAGE)
    assert (out.logits[after] - expected[after]).abs().amax(-1).min() > 1e-4
    # composes with a built-in patch (registered first, so it runs first), saves and reloads
    cfg = P.apply(model, mma={"assistant_token_ids": [V.ASSISTANT]}, blind=True)
    assert cfg.active == ("mma", "blind") and cfg.blind == BlindConfig()
    with torch.no_grad():
        both = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = P.from_pretrained(V.model_class("llava"), tmp_path)
    assert P.status(loaded)["active"] == ["mma", "blind"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, both, rtol=0, atol=1e-6)
    # off again: plain sdpa; a visibility patch is refused on FlashAttention-2
    P.apply(model, mma=False, blind=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[valid], expected[valid], rtol=0, atol=1e-6)
    flash = V.build("llava", num_layers=2)
    flash.config.text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="cannot express"):
        P.apply(flash, blind=True)
    assert ("blind-report", "nowhere.blind", "not a real command") in registry.cli_commands()


def test_default_argument_forms_and_errors(blind):
    model = V.build("llava", num_layers=2)
    assert P.apply(model, blind=BlindConfig(layers=(0,))).blind.layers == (0,)
    assert P.apply(model).blind.layers == (0,)  # None keeps the current setting
    with pytest.raises(HFKanConfigError, match="unknown option"):
        P.apply(model, blind={"layer": [0]})
    with pytest.raises(HFKanConfigError, match="blind must be"):
        P.apply(model, blind="on")
    with pytest.raises(HFKanConfigError, match="layer indices"):
        P.apply(model, blind={"layers": [-1]})
    with pytest.raises(HFKanConfigError, match="unknown patch"):
        P.apply(model, blinds=True)
    with pytest.raises(HFKanConfigError, match="needs a BlindConfig"):
        P.PatchConfig(blind={"layers": [0]})


def test_the_table_refuses_bad_or_clashing_specs(blind):
    registry.register(SPEC)  # the same spec again: no-op
    with pytest.raises(HFKanConfigError, match="already registered"):
        registry.register(PatchSpec(name="blind", config_class=BlindConfig, runtime_class=PatchRuntime))
    with pytest.raises(HFKanConfigError, match="reserved"):
        PatchSpec(name="processor", config_class=BlindConfig, runtime_class=BlindRuntime)
    with pytest.raises(HFKanConfigError, match="identifier"):
        PatchSpec(name="my-patch", config_class=BlindConfig, runtime_class=BlindRuntime)
    with pytest.raises(HFKanConfigError, match="dataclass"):
        PatchSpec(name="x", config_class=dict, runtime_class=BlindRuntime)
    with pytest.raises(HFKanConfigError, match="PatchRuntime"):
        PatchSpec(name="x", config_class=BlindConfig, runtime_class=object)


def test_unregistered_patches_are_unknown_to_stored_configs():
    assert "blind" not in registry.names()
    with pytest.raises(HFKanConfigError, match="unknown patch"):
        P.PatchConfig.from_dict({"blind": {"layers": [1]}})
    with pytest.raises(AttributeError, match="no patch"):
        P.PatchConfig().blind
