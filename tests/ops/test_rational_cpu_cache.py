"""The compiled CPU rational kernels come from Inductor's on-disk cache in a new process, and say they compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, logging
import torch
from torch._dynamo.utils import counters
from hf_kan.ops.rational.cpu import rational_cpu

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
x = torch.randn(64, 17, 32, requires_grad=True)
num, den = torch.randn(1, 6, requires_grad=True), torch.randn(8, 4, requires_grad=True)
rational_cpu(x, num, den, compile=True).sum().backward()
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.slow
def test_second_process_reuses_the_disk_cache():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reports = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.count("compiling the fused CPU rational kernels") == 1, result.stderr[-3000:]
        reports.append(json.loads(result.stdout.strip().splitlines()[-1]))
    # forward and backward graphs: compiled (or already cached) by the first process, loaded by the second
    assert reports[1].get("fxgraph_cache_hit", 0) == 2 and reports[1].get("fxgraph_cache_miss", 0) == 0, reports
