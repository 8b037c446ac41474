"""Saved patches: a checkpoint saved with patches on never runs stock attention when loaded by any Transformers path,
and every value read from a saved config gets the checks an ``apply`` argument gets."""

import json

import pytest
import torch
import vlm_models as V
from transformers import AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForPreTraining
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_kan  # noqa: F401
from hf_kan import hub
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError, InputLayoutError

MMA = {"assistant_token_ids": [V.ASSISTANT]}
PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]
#: the Auto classes a user or an evaluation harness loads a VLM checkpoint with (each where it maps the family;
#: Transformers 5.24 has no AutoModelForVision2Seq)
AUTO_CLASSES = (AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForPreTraining, AutoModel)


def _saved(tmp_path, family="llava", **patches):
    model = V.build(family, "sdpa")
    P.apply(model, **patches)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("family", V.FAMILIES)
def test_a_checkpoint_saved_with_patches_loads_on_hf_kan_through_every_auto_class(family, tmp_path):
    model = _saved(tmp_path, family, mma=MMA)
    assert json.loads((tmp_path / "config.json").read_text())["attn_implementation"] == {"text_config": "hf_kan"}
    inputs = V.make_inputs(family, PROMPTS)
    with torch.no_grad():
        expected = model(**inputs).logits
    autos = [cls for cls in AUTO_CLASSES if type(model.config) in cls._model_mapping]
    assert {AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModel} <= set(autos)
    for cls in (V.model_class(family), *autos):
        loaded = cls.from_pretrained(tmp_path)
        st = P.status(loaded)
        assert st["text_attn_implementation"] == "hf_kan" and st["active"] == ["mma"] and not st["running"]
        with pytest.raises(InputLayoutError, match="apply"), torch.no_grad():
            loaded(**inputs)  # never stock attention while the config says a patch is on
        P.apply(loaded)
        with torch.no_grad():
            out = loaded(**inputs)
        assert out.hf_kan_state.widened
        if cls is not AutoModel:  # the base model has no LM head
            torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)


def test_all_patches_off_saves_a_stock_checkpoint(tmp_path):
    model = V.build("llava", "sdpa")
    P.apply(model, mma=MMA)
    P.apply(model, mma=False)
    model.save_pretrained(tmp_path)
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    assert P.status(AutoModelForImageTextToText.from_pretrained(tmp_path))["text_attn_implementation"] == "sdpa"


def test_without_hf_kan_transformers_refuses_the_checkpoint_and_the_card_says_why(tmp_path, monkeypatch):
    model = _saved(tmp_path, mma=MMA)
    # what a process without hf_kan lacks for this load: the "hf_kan" attention and mask registrations
    monkeypatch.delitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "hf_kan")
    monkeypatch.delitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "hf_kan")
    with pytest.raises(ValueError, match="hf_kan"):
        AutoModelForImageTextToText.from_pretrained(tmp_path)
    card = hub.render_model_card(model, repo_id="me/vlm")
    assert "needs hf-kan" in card and 'attn_implementation="sdpa"' in card


@pytest.mark.parametrize("patch, option, value, match", [
    ("var", "sink_dims", [99], "hidden size"),
    ("var", "layers", [7], "do not exist"),
    ("mma", "assistant_token_ids", [999], "vocabulary"),
    ("prune", "layers", [9], "beyond"),
    ("dyvte", "layers", [9], "cannot exit"),
])
def test_saved_values_get_the_apply_checks_on_load_and_in_a_forward(tmp_path, patch, option, value, match):
    settings = {"var": {"sink_dims": [3], "layers": [1]}, "mma": MMA, "prune": {"layers": [1]},
                "dyvte": {"router_hidden": 8}}
    model = _saved(tmp_path, **{patch: settings[patch]})
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["hf_kan"][patch][option] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFKanConfigError, match=match):
        P.from_pretrained(AutoModelForImageTextToText, tmp_path)
    # the same value edited into a live model's stored section: its next forward refuses it
    model.config.text_config.hf_kan[patch][option] = value
    with pytest.raises(HFKanConfigError, match=match), torch.no_grad():
        model(**V.make_inputs("llava", PROMPTS))
