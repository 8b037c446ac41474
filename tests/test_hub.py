"""Model cards: generic renderer, per-model-type templates, save_pretrained / push_to_hub write README.md."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

import hf_kan.hub as hub
from hf_kan.errors import HFKanConfigError
from hf_kan.models.kat import KATConfig, KATForImageClassification


def tiny_kat() -> KATForImageClassification:
    return KATForImageClassification(
        KATConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  rational_groups=4, num_labels=3)
    )


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_kat_card_front_matter_and_body():
    model = tiny_kat()
    hub.set_model_card_info(model, converted_from="kat_tiny.pth", metrics={"accuracy": 0.97},
                            metrics_dataset="digits", metrics_source="measured with hf-kan", tags=["demo"])
    meta, body = split_card(hub.render_model_card(model, repo_id="me/kat-digits"))
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-classification"
    assert {"hf-kan", "kat", "demo"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["type"] == "accuracy" and result["metrics"][0]["value"] == 0.97
    assert result["dataset"]["name"] == "digits"
    assert "Kolmogorov-Arnold Transformer" in body  # the kat.md template, not the default one
    assert 'from_pretrained("me/kat-digits")' in body
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in body
    assert "`kat_tiny.pth`" in body and "| accuracy | 0.97 | digits |" in body
    assert "| `rational_groups` | `4` |" in body and "| `num_labels` | `3` |" in body
    assert "base_config_key" not in body and "base_model_tp_plan" not in body  # only the family's own fields
    assert "${" not in body  # every placeholder was filled


def test_unknown_model_type_falls_back_to_default_template():
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32, num_labels=2))
    assert hub.load_template("vit") == hub.load_template("no-such-type")
    meta, body = split_card(hub.render_model_card(vit))
    assert meta["pipeline_tag"] == "image-classification" and "vit" in meta["tags"]
    assert "model-index" not in meta and "base_model" not in meta
    assert "No evaluation results are recorded" in body and "Provenance of these weights was not recorded" in body
    assert "| `hidden_size` | `16` |" in body and "Kolmogorov-Arnold Transformer" not in body


def test_base_model_and_card_info_validation():
    model = tiny_kat()
    hub.set_model_card_info(model, base_model="someone/kat-tiny-in1k", datasets=["digits"])
    meta, body = split_card(hub.render_model_card(model))
    assert meta["base_model"] == "someone/kat-tiny-in1k" and meta["datasets"] == ["digits"]
    assert "Fine-tuned from" in body
    with pytest.raises(HFKanConfigError, match="unknown model-card keys"):
        hub.set_model_card_info(model, accuracy=0.9)


def test_save_pretrained_writes_readme_and_info_survives_reload(tmp_path):
    model = tiny_kat()
    hub.set_model_card_info(model, model_name="kat-digits", metrics={"accuracy": 0.96}, metrics_dataset="digits")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "# kat-digits" in card and "| accuracy | 0.96 |" in card
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.model_card_info["metrics"] == {"accuracy": 0.96}
    (tmp_path / "README.md").unlink()
    reloaded.save_pretrained(tmp_path / "again", model_card=False)
    assert not (tmp_path / "again" / "README.md").exists()


def test_push_to_hub_uploads_the_rendered_card_without_network(monkeypatch):
    model = tiny_kat()
    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": "user/" + repo_id})()

    def fake_upload(self, working_dir, repo_id, **kwargs):
        import os

        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(working_dir))
        uploaded["card"] = open(os.path.join(working_dir, "README.md")).read()
        return "ok"

    monkeypatch.setattr("transformers.utils.hub.hf_api", lambda: FakeApi())
    monkeypatch.setattr(KATForImageClassification, "_upload_modified_files", fake_upload, raising=False)
    assert model.push_to_hub("kat-test", tags=["extra-tag"]) == "ok"
    assert uploaded["repo_id"] == "user/kat-test"
    assert {"README.md", "config.json", "model.safetensors"} <= set(uploaded["files"])
    meta, body = split_card(uploaded["card"])
    assert "extra-tag" in meta["tags"] and "Kolmogorov-Arnold Transformer" in body
    assert 'from_pretrained("user/kat-test")' in body
