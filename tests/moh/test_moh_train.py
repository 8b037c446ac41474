"""The MoH continue-tuning entry point: one process in-process (CLI), two processes under ``accelerate launch``."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM

import hf_kan  # noqa: F401  (registers MoH)
from hf_kan.cli import main as cli_main
from hf_kan.errors import HFKanConfigError
from hf_kan.moh import MoHConfig, MoHLayer
from hf_kan.moh.train import MoHTuneArguments, embedded_corpus

TINY = ["--hidden-size", "32", "--num-heads", "4", "--num-kv-heads", "2", "--batch-size", "4", "--seq-len", "16"]


def check_output_dir(path, steps: int, processes: int) -> None:
    """The run wrote metrics, and its adapter reloads on the saved base model and changes its output."""
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["num_processes"] == processes
    assert math.isfinite(metrics["first_loss"]) and math.isfinite(metrics["final_loss"])
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
    assert not torch.allclose(model(ids).logits, expected_base, atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(model(ids).logits, expected_base)


def test_embedded_corpus_ships_with_package():
    lines = embedded_corpus()
    assert len(lines) > 30 and all(line.strip() for line in lines)


def test_moh_tune_cli_one_process(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["moh-tune", "--output-dir", str(out), "--max-steps", "3", *TINY]) == 0
    check_output_dir(out, steps=3, processes=1)


def test_query_norm_without_lora_is_rejected():
    with pytest.raises(HFKanConfigError, match="nothing would train"):
        MoHTuneArguments(lora_r=0, router="query_norm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "hf_kan.moh.train", "--output-dir", str(out), "--max-steps", "3", *TINY,
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_output_dir(out, steps=3, processes=2)
