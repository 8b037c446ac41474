"""The loader of Transformers' common-test helpers: cache reuse, loud failures, extraction of the needed files only."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import transformers_test_helpers as helpers

VERSION = "0.0.1"  # a fake release: nothing here may reach the package index


def fake_sdist(path: Path, files: dict[str, str]) -> Path:
    """A ``transformers-VERSION.tar.gz`` holding ``tests/<name>`` for each of ``files`` plus an unrelated file."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {**files, "test_unrelated.py": "raise AssertionError('must not be extracted')\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"transformers-{VERSION}/tests/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extracts_only_the_helper_files_and_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KAN_TEST_CACHE", str(tmp_path))
    calls = []

    def pip_download(version, dest, build_isolation):
        calls.append(build_isolation)
        fake_sdist(Path(dest) / f"transformers-{version}.tar.gz", {n: f"# {n}\n" for n in helpers.HELPER_FILES})
        return subprocess.CompletedProcess(["pip", "download"], 0, "", "")

    monkeypatch.setattr(helpers, "_pip_download", pip_download)
    root = helpers.helpers_dir(VERSION)
    assert root == tmp_path / VERSION and len(calls) == 1
    package = root / helpers.PACKAGE
    assert sorted(p.name for p in package.iterdir()) == sorted([*helpers.HELPER_FILES, "__init__.py"])
    assert (package / "test_modeling_common.py").read_text() == "# test_modeling_common.py\n"
    assert helpers.helpers_dir(VERSION) == root and len(calls) == 1  # second call: cache only
    # a helper file lost from the cache is re-extracted from the kept archive, without downloading again
    (package / "test_backbone_common.py").unlink()
    helpers.helpers_dir(VERSION)
    assert (package / "test_backbone_common.py").is_file() and len(calls) == 1


def test_download_failure_raises_with_pip_output(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KAN_TEST_CACHE", str(tmp_path))

    def pip_download(version, dest, build_isolation):
        return subprocess.CompletedProcess(["pip", "download"], 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(helpers, "_pip_download", pip_download)
    with pytest.raises(helpers.TransformersTestHelpersError, match="No matching distribution found"):
        helpers.helpers_dir(VERSION)
    assert not (tmp_path / VERSION / helpers.PACKAGE / "test_modeling_common.py").exists()


def test_sdist_without_a_helper_file_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KAN_TEST_CACHE", str(tmp_path))

    def pip_download(version, dest, build_isolation):
        fake_sdist(Path(dest) / f"transformers-{version}.tar.gz", {"test_modeling_common.py": "\n"})
        return subprocess.CompletedProcess(["pip", "download"], 0, "", "")

    monkeypatch.setattr(helpers, "_pip_download", pip_download)
    with pytest.raises(helpers.TransformersTestHelpersError, match="has no .*tests/test_configuration_common.py"):
        helpers.helpers_dir(VERSION)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_KAN_TEST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert helpers.cache_root() == tmp_path / "hf-kan" / "transformers-tests"
    monkeypatch.setenv("HF_KAN_TEST_CACHE", str(tmp_path / "elsewhere"))
    assert helpers.cache_root() == tmp_path / "elsewhere"
