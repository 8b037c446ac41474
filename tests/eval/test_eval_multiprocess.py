"""The runner under ``accelerate launch --multi_gpu --num_processes 2`` (two CPU processes in one gloo group):
the same answers, metrics and efficiency figures as one process, and the processes exit (no gloo hang)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from hf_kan.eval import Runner, evaluate_task

SETTINGS = ["off", "prune=fastv"]
LIMIT = 10  # not a multiple of the process count: the shards differ in size


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_llava_dir, tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "hf_kan.eval.run", "--model", str(tiny_llava_dir),
               *[arg for s in SETTINGS for arg in ("--setting", s)], "--limit", str(LIMIT), "--batch-size", "4",
               "--output-json", str(out), "--no-progress-bar"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("hf_kan_digits: 10 samples, 2 process(es)") == 1  # printed by the main process only
    multi = json.loads(out.read_text())
    assert multi["num_processes"] == 2

    runner = Runner.from_pretrained(str(tiny_llava_dir), batch_size=4)
    single = evaluate_task(runner, "hf_kan_digits", SETTINGS, limit=LIMIT)
    for got, want in zip(multi["results"], single):
        assert got["setting"]["name"] == want.setting["name"]
        assert [r["index"] for r in got["samples"]] == list(range(LIMIT))
        assert [r["prediction"] for r in got["samples"]] == [r["prediction"] for r in want.samples]
        assert [r["efficiency"] for r in got["samples"]] == [r["efficiency"] for r in want.samples]
        for metric, value in want.metrics.items():
            if not metric.endswith("_seconds"):
                assert got["metrics"][metric] == pytest.approx(value), metric
