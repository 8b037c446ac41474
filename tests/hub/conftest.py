"""Fixtures of the Hub tests: the local Hub double and a way to run Python against it in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_double import HubDouble

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub():
    """A running :class:`HubDouble` (stopped after the test)."""
    with HubDouble() as double:
        yield double


@pytest.fixture
def run_against_hub(hub):
    """``run(args)``: run ``python <args>`` in a subprocess whose Hub is the double (``HF_ENDPOINT``), with a dummy
    token and the offline switches of the test configuration lifted; fails the test on a non-zero exit."""

    def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN="hf_hub_double_token",
                   HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                                cwd=REPO_ROOT)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert not hub.unhandled, hub.unhandled
        return result

    return run
