"""``hf-kan eval``: the table's numbers equal a direct recomputation (plain ``generate`` on one sample at a time +
exact match), the outputs exist and parse, and settings the checkpoint cannot run are skipped with a reason."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from hf_kan.eval.patch_report import default_settings, parse_setting
from hf_kan.eval.tasks import task_samples
from tiny_shapes_vlm import packaged_tiny_model

LIMIT = 10


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    return packaged_tiny_model(str(tmp_path_factory.getbasetemp() / "tiny-shapes-vlm"))


def _direct_predictions(model_dir, setting: dict, samples) -> list[str]:
    """Greedy first answer token of each sample alone (no batch, no padding), under ``setting``'s patches."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hf_kan import patches
    from hf_kan.vlm.processing import prompt_text

    model = patches.from_pretrained(AutoModelForImageTextToText, model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    patches.apply(model, **{k: (False if v is None else v) for k, v in setting.items() if k != "name"})
    out = []
    for sample in samples:
        inputs = processor(images=sample.images, text=prompt_text(processor, sample.question), return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        out.append(processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


@pytest.mark.slow
def test_eval_table_matches_direct_generation_and_files_parse(packaged, tmp_path):
    from hf_kan.cli import main

    _, model_dir, _ = packaged
    out = tmp_path / "eval"
    code = main(["eval", str(model_dir), "--limit", str(LIMIT), "--batch-size", "4", "--timing-rounds", "2",
                 "--timing-batch", "4", "--output-dir", str(out), "--no-progress-bar"])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    names = [r["setting"] for r in report["rows"]]
    assert names == ["unpatched", "fastv-50", "fastv-25", "pdrop", "fastv-50+debias", "dyvte", "var"]
    assert [s["setting"] for s in report["skipped"]] == ["mma"]
    with open(out / "eval.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["setting"] for r in rows] == names
    assert float(rows[1]["accuracy"]) == pytest.approx(report["rows"][1]["accuracy"])
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    samples = task_samples("hf_kan_shapes_vqa", limit=LIMIT)
    by_name = {r["setting"]: r for r in report["rows"]}
    for name in ("unpatched", "fastv-25", "dyvte"):
        predictions = _direct_predictions(model_dir, report["settings"][name], samples)
        assert [s["prediction"] for s in report["samples"][name]] == predictions, name
        correct = [p == s.answer for p, s in zip(predictions, samples)]
        assert by_name[name]["accuracy"] == pytest.approx(sum(correct) / LIMIT)
        for kind in {s.meta["question_type"] for s in samples}:
            hits = [c for c, s in zip(correct, samples) if s.meta["question_type"] == kind]
            assert by_name[name][f"accuracy/{kind}"] == pytest.approx(sum(hits) / len(hits))

    # 4 decoder layers, 9 image tokens: FastV at layer 2 keeps 5 (50 %) or 2 (25 %) from there on
    assert by_name["unpatched"]["visual_token_budget"] == 1.0 and by_name["unpatched"]["visual_tokens_kept"] == 9
    assert by_name["fastv-50"]["visual_token_budget"] == pytest.approx((9 + 9 + 5 + 5) / 36)
    assert by_name["fastv-25"]["visual_tokens_kept"] == 2
    assert by_name["fastv-25"]["prefill_flops_ratio"] < by_name["fastv-50"]["prefill_flops_ratio"] < 1
    assert by_name["unpatched"]["prefill_latency_ratio"] == 1.0
    assert all(r["prefill_latency_ratio"] > 0 and r["decode_latency_ratio"] > 0 for r in report["rows"])


@pytest.mark.slow
def test_default_settings_skip_what_the_checkpoint_lacks(packaged):
    from transformers import AutoModelForImageTextToText

    from hf_kan import patches

    trained, _, _ = packaged
    model = patches.from_pretrained(AutoModelForImageTextToText, trained)
    plans = {p.setting.name: p for p in default_settings(model)}
    assert {n for n, p in plans.items() if p.skip} == {"mma", "fastv-50+debias", "dyvte", "var"}
    assert "calibrate-prune" in plans["fastv-50+debias"].skip and "calibrate-var" in plans["var"].skip
    assert plans["pdrop"].setting.prune["layers"] == [1, 2, 3]
    assert plans["fastv-25"].setting.prune == {"method": "fastv", "layers": [2], "keep_ratios": [0.25]}
    assert all(v is False for k, v in plans["unpatched"].setting.patches.items())


def test_parse_setting_names_and_methods():
    plan = parse_setting('fastv-75=prune={"method":"fastv","keep_ratios":[0.75]}')
    assert plan.setting.name == "fastv-75" and plan.method == "fastv"
    assert plan.setting.prune == {"method": "fastv", "keep_ratios": [0.75]}
    plan = parse_setting("prune=pdrop")
    assert plan.setting.name == "prune=pdrop" and plan.setting.prune == "pdrop"


def test_shapes_task_is_a_prefix_stream_with_question_types():
    five, ten = task_samples("hf_kan_shapes_vqa", limit=5), task_samples("hf_kan_shapes_vqa", limit=10)
    assert [s.question for s in five] == [s.question for s in ten[:5]]
    assert [s.meta["question_type"] for s in five] == ["colour", "shape", "presence", "count", "position"]
    assert five[0].images[0].size == (48, 48)


def test_default_settings_keep_mma_on_for_a_model_trained_with_it():
    from hf_kan import patches
    from hf_kan.vlm.modeling import VLMShape, build_vlm
    from hf_kan.vlm.processing import build_processor

    processor = build_processor(48, 16)
    model = build_vlm("kat", VLMShape(patch_size=16, vision_hidden_size=32, vision_layers=1, vision_heads=2,
                                      text_hidden_size=32, text_layers=2, text_heads=2, text_kv_heads=1),
                      processor.tokenizer)
    patches.apply(model, mma=True, processor=processor)
    plans = {p.setting.name: p for p in default_settings(model)}
    assert plans["mma"].skip is None and plans["unpatched"].setting.mma is False
    mma = patches.status(model)["patches"]["mma"]
    assert all(plans[n].setting.mma == mma for n in ("mma", "fastv-50", "fastv-25", "pdrop"))
    assert plans["fastv-50"].setting.prune["layers"] == [1]  # FastV's layer 2 does not exist in 2 layers


def test_outputs_without_matplotlib_skip_only_the_plot(tmp_path, monkeypatch):
    import importlib.util

    from hf_kan.eval import patch_report

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    row = {"setting": "unpatched", "method": "unpatched", "accuracy": 0.5, "visual_token_budget": 1.0}
    paths = patch_report.write_outputs({"rows": [row], "task": "t", "num_samples": 1}, str(tmp_path))
    assert sorted(paths) == ["csv", "json"] and not (tmp_path / "eval.png").exists()
    assert json.loads((tmp_path / "eval.json").read_text())["rows"] == [row]
