"""``hf-kan demo``: both models train and save, the table reports accuracies and the step-time ratio."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from hf_kan.cli import build_parser, main
from hf_kan.train.demo import DemoArguments, format_table, model_arguments


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
    for field in ("image_size", "patch_size", "epochs", "batch_size", "learning_rate", "seed"):
        assert getattr(kat, field) == getattr(vit, field)
    assert kat.output_dir != vit.output_dir


def test_table_reports_ratio_and_target():
    fake = {
        "kat": {
            "num_parameters": 10,
            "eval_accuracy": 0.5,
            "best_eval_accuracy": 0.6,
            "step_time_median_s": 0.03,
            "train_runtime_s": 1.0,
        },
        "vit": {
            "num_parameters": 9,
            "eval_accuracy": 0.7,
            "best_eval_accuracy": 0.7,
            "step_time_median_s": 0.02,
            "train_runtime_s": 1.0,
        },
    }
    table = format_table(fake)
    assert "KAT/ViT" in table and "1.50" in table and "NOT reached" in table
    fake["kat"]["best_eval_accuracy"] = 0.95
    assert "95% test accuracy: reached" in format_table(fake)


def test_demo_command_trains_and_saves_both(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--image-size",
        "8",
        "--patch-size",
        "2",
        "--hidden-size",
        "32",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--no-progress-bar",
    ]
    assert build_parser().parse_args(args).epochs == 1.0
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "KAT" in printed and "VIT" in printed and "step-time ratio KAT/ViT" in printed
    for family in ("kat", "vit"):
        assert AutoConfig.from_pretrained(out / family).model_type == family
        metrics = json.loads((out / family / "metrics.json").read_text())
        # one epoch of 1437 rows at batch 32 = 45 steps
        assert metrics["steps"] == 45 and 0.0 <= metrics["best_eval_accuracy"] <= 1.0
        assert f"{metrics['eval_accuracy']:.4f}" in printed
