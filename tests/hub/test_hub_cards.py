"""Model cards: generic renderer, per-model-type templates, save_pretrained / push_to_hub write README.md."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessor

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
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    assert model.push_to_hub("kat-test", tags=["extra-tag"], image_processor=processor) == "ok"
    assert uploaded["repo_id"] == "user/kat-test"
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(uploaded["files"])
    meta, body = split_card(uploaded["card"])
    assert "extra-tag" in meta["tags"] and "Kolmogorov-Arnold Transformer" in body
    assert 'from_pretrained("user/kat-test")' in body


def test_patched_vlm_card_lists_patches_citations_and_runner_results():
    from huggingface_hub import ModelCard
    from tiny_vlm_checkpoint import model as tiny_llava

    from hf_kan import patches

    vlm = tiny_llava()
    patches.apply(vlm, prune={"method": "pdrop", "layers": [1, 2, 3], "debias": True}, var={"sink_dims": [3]})
    rows = hub.eval_results_from_runner([
        {"task": "hf_kan_digits", "setting": {"name": "off"}, "num_samples": 8,
         "metrics": {"answer_accuracy": 0.25, "prefill_flops": 2.0e6, "prefill_seconds": 0.1}},
        {"task": "hf_kan_digits", "setting": {"name": "prune=pdrop"}, "num_samples": 8,
         "metrics": {"answer_accuracy": 0.125, "prefill_flops": 1.5e6, "decode_seconds": 0.1}},
    ])
    assert [(r["setting"], r["metric"]) for r in rows] == [("off", "answer_accuracy"), ("off", "prefill_flops"),
                                                           ("prune=pdrop", "answer_accuracy"),
                                                           ("prune=pdrop", "prefill_flops")]
    hub.set_model_card_info(vlm, eval_results=rows)
    card = ModelCard(hub.render_model_card(vlm, repo_id="me/vlm"))
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert {"hf-kan", "llava", "hf-kan-prune", "hf-kan-var"} <= set(card.data.tags)
    assert sorted((r.metric_config, r.metric_type, r.metric_value) for r in card.data.eval_results) == [
        ("off", "answer_accuracy", 0.25), ("off", "prefill_flops", 2.0e6),
        ("prune=pdrop", "answer_accuracy", 0.125), ("prune=pdrop", "prefill_flops", 1.5e6)]
    for key in ("kang2025var", "xing2024pyramiddrop", "zhao2025debias"):
        assert f"{{{key}," in card.text
    assert "chen2024fastv" not in card.text and "aki2025mma" not in card.text  # only the methods in use
    assert "Active patches: `var`, `prune`." in card.text and "| `prune` | `debias` | `true` |" in card.text
    assert 'patches.from_pretrained(AutoModelForImageTextToText, "me/vlm")' in card.text
    assert "${" not in card.text


def test_adapter_card_without_a_method_template_uses_the_generic_one():
    from huggingface_hub import ModelCard
    from peft import LoraConfig

    card = ModelCard(hub.render_adapter_card(LoraConfig(r=4, base_model_name_or_path="org/base"), num_parameters=1234))
    assert card.data.library_name == "peft" and card.data.base_model == "org/base"
    assert "1,234 adapter parameters" in card.text and "`r` | `4`" in card.text
    local = ModelCard(hub.render_adapter_card(LoraConfig(base_model_name_or_path="/some/local/dir"), num_parameters=1))
    assert local.data.base_model is None and "`/some/local/dir`" in local.text  # a local path is no Hub base model


def test_moh_adapter_card_is_rendered_by_the_hub_with_the_method_parts_from_moh():
    from huggingface_hub import ModelCard

    from hf_kan.moh import MoHConfig
    from hf_kan.moh.card import moh_method_table

    config = MoHConfig(task_type="CAUSAL_LM", base_model_name_or_path="org/base")
    # without MoH's parts (what `hf-kan push` of a bare adapter directory renders): every placeholder still filled
    plain = ModelCard(hub.render_adapter_card(config.to_dict(), num_parameters=10))
    assert plain.data.library_name == "peft" and plain.data.pipeline_tag == "text-generation"
    assert plain.data.base_model == "org/base" and {"hf-kan", "peft", "moh"} <= set(plain.data.tags)
    assert "Mixture-of-Head attention (MoH)" in plain.text and "| `router` | `'query_norm'` |" in plain.text
    assert plain.text.count("@article{jin2024moh,") == 1 and hub.citation("moh") in plain.text
    assert "How this adapter was trained was not recorded." in plain.text and "${" not in plain.text
    # with them: the same card, the method section and training text replaced
    table = moh_method_table(config, 4, 2)
    card = ModelCard(hub.render_adapter_card(config, num_parameters=10, repo_id="me/moh",
                                             fields={"method_table": table, "training": "Tuned for 3 steps."}))
    assert table in card.text and "Tuned for 3 steps." in card.text and "not recorded" not in card.text
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/moh")' in card.text
    assert 'AutoModelForCausalLM.from_pretrained("org/base")' in card.text
    assert "| active heads per token | 3 of 4 (75%) |" in card.text and "${" not in card.text


def test_the_hub_module_imports_no_method_nor_model_family():
    """hub.py imports only hf_kan.errors from hf-kan, counting imports inside functions (issue 11: a lazy import
    that closes a cycle is still a cycle; moh.card and the modeling files import hub)."""
    import ast

    tree = ast.parse(open(hub.__file__, encoding="utf-8").read())
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            own |= {f"hf_kan.{node.module}" if node.module else f"hf_kan.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_kan"):
            own.add(node.module)
        elif isinstance(node, ast.Import):
            own |= {a.name for a in node.names if a.name.startswith("hf_kan")}
    assert own == {"hf_kan.errors"}


def test_a_saved_model_card_is_kept_for_upload_with_eval_results_merged(tmp_path):
    from huggingface_hub import ModelCard

    model = tiny_kat()
    hub.set_model_card_info(model, training="Trained for 7 steps.", metrics={"accuracy": 0.9},
                            metrics_dataset="digits")
    model.save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text((tmp_path / "README.md").read_text() + "\nA note added by hand.\n")
    row = {"task": "hf_kan_digits", "split": "test", "setting": "off", "metric": "answer_accuracy", "value": 0.5,
           "num_samples": 4}
    card = ModelCard(hub.upload_card(tmp_path, "me/kat", eval_results=[row]))
    assert "Trained for 7 steps." in card.text and "A note added by hand." in card.text
    assert 'AutoModelForImageClassification.from_pretrained("me/kat")' in card.text
    assert "path/to/this/model" not in card.text
    assert "| hf_kan_digits | test | `off` | answer_accuracy | 0.5 | 4 |" in card.text.split("## Evaluation")[1]
    assert sorted((r.dataset_name, r.metric_type, r.metric_value) for r in card.data.eval_results) == [
        ("digits", "accuracy", 0.9), ("hf_kan_digits", "answer_accuracy", 0.5)]
    # the same result pushed again replaces its earlier entry instead of adding a second one
    (tmp_path / "README.md").write_text(str(card))
    again = ModelCard(hub.upload_card(tmp_path, "me/kat", eval_results=[{**row, "value": 0.75}]))
    assert sorted((r.metric_type, r.metric_value) for r in again.data.eval_results) == [
        ("accuracy", 0.9), ("answer_accuracy", 0.75)]
