"""Fixtures of the evaluation tests: a saved tiny LLaVA checkpoint, and a Python with lmms-eval for running the real
``lmms-eval`` CLI against the plugin.

lmms-eval is not a test dependency of hf-kan (a plain install pulls ~150 packages, including a CUDA torch that would
replace the pinned CPU build, and filelock 4 breaks its import). The ``lmms_python`` fixture builds, once per
machine and cached, the lightest install that runs it: a virtual environment outside the repository that sees this
environment's packages through a ``.pth`` file (so torch, transformers and the editable hf-kan are shared, never
reinstalled), with ``lmms-eval`` installed ``--no-deps`` plus the few pure-Python packages its CLI imports
(:data:`LMMS_LIGHT_DEPS`; filelock pinned below 4 there only). A failed install fails the test loudly.
Cold: about 30 s; cached: instant. Set ``HF_KAN_TEST_CACHE`` to move the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_vlm_checkpoint

LMMS_EVAL = "lmms-eval==0.7.3"
#: what lmms-eval 0.7.3's CLI and evaluator import beyond hf-kan's own dependencies (installed with their deps)
LMMS_LIGHT_DEPS = ("filelock==3.32.7", "loguru==0.7.3", "pytablewriter==1.2.1", "pytz==2026.6", "sacrebleu==2.6.0",
                   "tenacity==9.2.1")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA checkpoint with tokenizer and processor (``tests/tiny_vlm_checkpoint.py``)."""
    return tiny_vlm_checkpoint.save(tmp_path_factory.mktemp("tiny-llava"))


def _cache_root() -> Path:
    return Path(os.environ.get("HF_KAN_TEST_CACHE", Path.home() / ".cache" / "hf-kan-tests"))


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-3000:]}", pytrace=False)


def _python_of(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _build_lmms_env(env_dir: Path) -> None:
    shutil.rmtree(env_dir, ignore_errors=True)
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], "creating the lmms-eval venv")
    python = _python_of(env_dir)
    own_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
    # addsitedir also runs the parents' .pth files (the editable hf-kan install lives in one)
    Path(own_site, "zz_hf_kan_parent_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", LMMS_EVAL], f"pip install --no-deps {LMMS_EVAL}")
    _run([*pip, *LMMS_LIGHT_DEPS], "pip install of lmms-eval's light dependencies")
    import torch

    check = ("import lmms_eval.__main__, lmms_eval.models, hf_kan.eval.lmms_model, torch, filelock, sys; "
             f"assert torch.__version__ == {torch.__version__!r}, torch.__version__; "
             "assert int(filelock.__version__.split('.')[0]) < 4, filelock.__version__")
    _run([str(python), "-c", check], "importing lmms-eval in its venv")


@pytest.fixture(scope="session")
def lmms_python() -> Path:
    """The Python executable of a cached venv where ``python -m lmms_eval`` runs with this hf-kan (see module doc)."""
    from filelock import FileLock

    key = hashlib.sha256("\n".join([sys.prefix, LMMS_EVAL, *LMMS_LIGHT_DEPS]).encode()).hexdigest()[:16]
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    env_dir = root / f"lmms-eval-0.7.3-{key}"
    with FileLock(str(root / f"{env_dir.name}.lock"), timeout=900):
        if not (env_dir / ".complete").is_file():
            _build_lmms_env(env_dir)
            (env_dir / ".complete").write_text(f"{sys.prefix}\n")
    return _python_of(env_dir)
