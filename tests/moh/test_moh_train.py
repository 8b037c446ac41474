"""The MoH continue-tuning entry point: one process in-process (CLI), two processes under ``accelerate launch``;
selection on validation with one test evaluation, offline reloads, the hf-kan adapter card, clean exits."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM

import hf_kan  # noqa: F401  (registers MoH)
from hf_kan.cli import main as cli_main
from hf_kan.errors import HFKanConfigError
from hf_kan.moh import MoHConfig, MoHLayer
from hf_kan.moh import train as moh_train
from hf_kan.moh.train import MoHTuneArguments, embedded_corpus, embedded_corpus_splits, evaluate_lm

TINY = ["--hidden-size", "32", "--num-heads", "4", "--num-kv-heads", "2", "--batch-size", "4", "--seq-len", "16"]


def check_output_dir(path, steps: int, processes: int) -> dict:
    """The run wrote metrics and an hf-kan card; its adapter reloads offline both ways and changes the output."""
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["num_processes"] == processes
    assert math.isfinite(metrics["first_loss"]) and math.isfinite(metrics["test_loss"])
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((path / "base_model").resolve())
    base = LlamaForCausalLM.from_pretrained(path / "base_model").eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(["the small boat left the harbour before sunrise"], return_tensors="pt")["input_ids"]
    expected_base = base(ids).logits
    model = PeftModel.from_pretrained(base, path)
    config = model.peft_config["default"]
    assert isinstance(config, MoHConfig) and config.lora_config["r"] == 8
    assert sum(isinstance(m, MoHLayer) for m in model.modules()) == 2
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero; training must move it"
    adapted = model(ids).logits
    assert not torch.allclose(adapted, expected_base, atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(model(ids).logits, expected_base)
    # AutoPeftModel finds the base model through adapter_config.json, offline (HF_HUB_OFFLINE=1 in conftest)
    auto = AutoPeftModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(auto(ids).logits, adapted)
    card = (path / "README.md").read_text()
    assert "library_name: peft" in card and "Mixture-of-Head attention (MoH)" in card
    assert "| heads per attention block | 4: 2 shared (always on) + top 1 of 2 routed |" in card
    assert "AutoPeftModelForCausalLM.from_pretrained" in card and f"{metrics['test_loss']:.4f}" in card
    assert "${" not in card and "[More Information Needed]" not in card  # no unfilled template, not PEFT's blank
    parsed = ModelCard.load(path / "README.md")  # rendered by hf_kan.hub: citation from moh.bib, test figures indexed
    assert parsed.data.pipeline_tag == "text-generation" and {"hf-kan", "moh", "lora"} <= set(parsed.data.tags)
    assert {(r.metric_type, r.metric_value) for r in parsed.data.eval_results} == {
        ("test_loss", metrics["test_loss"]), ("test_perplexity", metrics["test_perplexity"])}
    assert "@article{jin2024moh," in card and "| `router` | `'query_norm'` |" in card
    return metrics


def test_embedded_corpus_ships_with_package_and_splits_by_line():
    lines = embedded_corpus()
    assert len(lines) > 30 and all(line.strip() for line in lines)
    splits = embedded_corpus_splits()
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (32, 5, 5)
    assert sorted(sum(splits.values(), [])) == sorted(lines)
    assert embedded_corpus_splits() == splits  # fixed


def test_moh_tune_cli_selects_on_validation_and_tests_once(tmp_path, monkeypatch):
    calls = []

    def spy(model, loader, accelerator, split):
        calls.append(split)
        return evaluate_lm(model, loader, accelerator, split)

    monkeypatch.setattr(moh_train, "evaluate_lm", spy)
    out = tmp_path / "run"
    assert cli_main(["moh-tune", "--output-dir", str(out), "--max-steps", "5", "--eval-steps", "2", *TINY]) == 0
    assert calls == ["validation"] * 3 + ["test"]  # steps 2, 4 and 5, then the selected adapter on test
    metrics = check_output_dir(out, steps=5, processes=1)
    best = min(metrics["history"], key=lambda h: h["validation_loss"])
    assert (metrics["best_step"], metrics["validation_loss"]) == (best["step"], best["validation_loss"])
    assert metrics["validation_source"] == "split 'validation'" and metrics["test_source"] == "split 'test'"


def test_user_text_data_gets_a_validation_split_and_a_local_model_an_absolute_path(tmp_path, monkeypatch):
    first = tmp_path / "first"
    assert cli_main(["moh-tune", "--output-dir", str(first), "--max-steps", "1", *TINY]) == 0
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(embedded_corpus()) + "\n")
    monkeypatch.chdir(tmp_path)  # a relative --model must still be recorded as an absolute path
    second = tmp_path / "second"
    args = ["moh-tune", "--output-dir", str(second), "--max-steps", "2", "--model", "first/base_model",
            "--tokenizer", "first", "--dataset", "text", "--data-files", str(text), "--router", "learned",
            "--lora-r", "0", "--batch-size", "4", "--seq-len", "16"]  # fmt: skip
    assert cli_main(args) == 0
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["validation_source"] == "10% of 'train' held out, seed 0" and metrics["test_loss"] is None
    config = json.loads((second / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((first / "base_model").resolve())
    assert "the data set has no test split" in (second / "README.md").read_text()


def test_query_norm_without_lora_is_rejected():
    with pytest.raises(HFKanConfigError, match="nothing would train"):
        MoHTuneArguments(lora_r=0, router="query_norm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(out, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "hf_kan.moh.train", "--output-dir", str(out), *TINY, *extra,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # a process group left alive made one run in three hang after writing its metrics: the timeout catches that
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeWarning" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_accelerate_launch_two_processes_exits_every_time(tmp_path):
    launch_two_processes(tmp_path / "run", "--max-steps", "3", "--eval-steps", "2")
    check_output_dir(tmp_path / "run", steps=3, processes=2)
    for attempt in range(1):  # launched twice in all, each must exit by itself
        launch_two_processes(tmp_path / f"again{attempt}", "--max-steps", "1", timeout=180)
        assert json.loads((tmp_path / f"again{attempt}" / "metrics.json").read_text())["num_processes"] == 2
