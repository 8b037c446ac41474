"""``hf-kan demo``: both models train on the fixed split, are selected on validation, tested once, saved complete;
the table reports test accuracy and the interleaved step-time ratio."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from hf_kan.cli import build_parser, main
from hf_kan.data import load_digits_dataset
from hf_kan.train import image_classification as trainer
from hf_kan.train.demo import DemoArguments, format_table, model_arguments, time_training_steps


@pytest.fixture(autouse=True)
def _eager_rational(monkeypatch):
    monkeypatch.setenv("HF_KAN_RATIONAL_CPU_COMPILE", "0")


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models train fastest on one thread; more threads spin-wait when xdist workers share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_both_sides_share_the_recipe_and_sizes():
    demo = DemoArguments(hidden_size=48, num_layers=3, num_heads=3, epochs=2)
    kat, vit = model_arguments(demo, "kat"), model_arguments(demo, "vit")
    assert (kat.model, vit.model) == ("kat-tiny", "vit-tiny")
    assert (
        kat.config_overrides
        == vit.config_overrides
        == {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 192}
    )
    for field in ("image_size", "patch_size", "epochs", "batch_size", "learning_rate", "seed", "split_seed"):
        assert getattr(kat, field) == getattr(vit, field)
    assert kat.output_dir != vit.output_dir


def test_table_reports_test_accuracy_ratio_and_target():
    fake = {
        family: {"num_parameters": 10, "validation_accuracy": 0.9, "test_accuracy": acc, "train_runtime_s": 1.0}
        for family, acc in (("kat", 0.5), ("vit", 0.7))
    }
    timing = {"step_s": {"kat": 0.03, "vit": 0.02}, "ratio_median": 1.5, "ratio_q1": 1.4, "ratio_q3": 1.6,
              "rounds": 30, "block": 5}  # fmt: skip
    table = format_table(fake, timing)
    assert "KAT/ViT: 1.50" in table and "interquartile range 1.40-1.60" in table and "NOT reached (50.00%)" in table
    assert "30.0" in table and "20.0" in table  # step ms
    fake["kat"]["test_accuracy"] = 0.95
    fake["kat"]["validation_accuracy"] = 0.5  # the verdict is on the test accuracy, not the selection split
    assert "95% test accuracy: reached (95.00%)" in format_table(fake)


def test_interleaved_timing_measures_both_models_on_the_same_batch():
    demo = DemoArguments(image_size=8, patch_size=2, hidden_size=32, num_layers=1, num_heads=2, timing_rounds=4,
                         timing_block=2)  # fmt: skip
    timing = time_training_steps(demo)
    assert len(timing["ratios"]) == 4 and set(timing["step_s"]) == {"kat", "vit"}
    assert timing["ratio_q1"] <= timing["ratio_median"] <= timing["ratio_q3"]
    assert all(r > 0 for r in timing["ratios"]) and all(t > 0 for t in timing["step_s"].values())


def test_demo_command_reports_the_test_accuracy_of_the_model_selected_on_validation(tmp_path, capsys, monkeypatch):
    evaluations = []  # (family output dir, split) in call order
    original = trainer.evaluate

    def spy(model, loader, accelerator, split="validation"):
        evaluations.append(split)
        return original(model, loader, accelerator, split)

    monkeypatch.setattr(trainer, "evaluate", spy)
    out = tmp_path / "demo"
    args = ["demo", "--output-dir", str(out), "--epochs", "2", "--image-size", "8", "--patch-size", "2",
            "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--no-progress-bar",
            "--timing-rounds", "3", "--timing-block", "2"]  # fmt: skip
    assert build_parser("demo").parse_args(args).epochs == 2.0
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "KAT" in printed and "VIT" in printed and "step-time ratio KAT/ViT" in printed
    # per model: one validation run per epoch, then the test split once, at the end
    assert evaluations == ["validation", "validation", "test"] * 2
    digits = load_digits_dataset(image_size=8, num_channels=3)
    for family in ("kat", "vit"):
        path = out / family
        assert AutoConfig.from_pretrained(path).model_type == family
        metrics = json.loads((path / "metrics.json").read_text())
        assert metrics["steps"] == 2 * 40  # 1257 training rows at batch 32
        best = max(metrics["history"], key=lambda h: h["validation_accuracy"])
        assert (metrics["best_step"], metrics["validation_accuracy"]) == (best["step"], best["validation_accuracy"])
        assert f"{metrics['test_accuracy']:.4f}" in printed and f"{metrics['validation_accuracy']:.4f}" in printed
        # the saved model is the selected one, and the printed test accuracy is its accuracy on the test split
        model = AutoModelForImageClassification.from_pretrained(path).eval()
        for split in ("validation", "test"):
            rows = digits[split].with_format("torch")[:]
            with torch.no_grad():
                accuracy = (model(pixel_values=rows["pixel_values"]).logits.argmax(-1) == rows["label"]).float().mean()
            assert accuracy.item() == pytest.approx(metrics[f"{split}_accuracy"])
        assert AutoImageProcessor.from_pretrained(path).size == {"height": 8, "width": 8}
