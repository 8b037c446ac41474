"""Transformers' own common-test helpers (``ModelTesterMixin``, ``ConfigTester``, ``BackboneTesterMixin``), taken
from the source distribution of the INSTALLED Transformers release.

The helpers are not in the wheel; the sdist on the package index carries them under ``tests/``. On first use
:func:`load_transformers_test_helpers` runs ``pip download --no-binary :all: --no-deps transformers==<installed>``
into ``$XDG_CACHE_HOME/hf-kan/transformers-tests/<version>/`` (default ``~/.cache/...``; ``HF_KAN_TEST_CACHE``
overrides the root), keeps the archive there, and extracts only the helper files it needs into a package
``transformers_common_tests`` next to it. Later runs reuse the cache; parallel workers (pytest-xdist) serialise on
a file lock. Nothing is copied into this repository. A failed download or a missing file raises
:class:`TransformersTestHelpersError`, which fails the test module's collection: never a silent skip.

The helpers import three modules the sdist does not ship; :mod:`transformers_test_stand_ins` provides them (see
its docstring for what that leaves out).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers_test_stand_ins
from filelock import FileLock

PACKAGE = "transformers_common_tests"
# the helper files, as found under tests/ in the sdist
HELPER_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_backbone_common.py")
# modules the helpers import relatively that the sdist lacks -> provided by transformers_test_stand_ins
STAND_IN_MODULES = ("exporters.test_export", "generation.test_utils", "utils.test_configuration_utils")
DOWNLOAD_TIMEOUT_S = 600


class TransformersTestHelpersError(RuntimeError):
    """The Transformers sdist could not be fetched, or lacks a helper file the hf-kan tests need."""


def cache_root() -> Path:
    """``$HF_KAN_TEST_CACHE``, else ``$XDG_CACHE_HOME/hf-kan/transformers-tests``, else ``~/.cache/...``."""
    if os.environ.get("HF_KAN_TEST_CACHE"):
        return Path(os.environ["HF_KAN_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hf-kan" / "transformers-tests"


def _pip_download(version: str, dest: str, build_isolation: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", dest, f"transformers=={version}"]
    if not build_isolation:
        cmd.insert(-1, "--no-build-isolation")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise TransformersTestHelpersError(f"`{' '.join(cmd)}` timed out after {DOWNLOAD_TIMEOUT_S} s") from exc


def _download_sdist(version: str, dest: Path) -> Path:
    """``pip download`` the sdist of ``transformers==version`` into ``dest``; return the archive's path.

    pip prepares the sdist's metadata (a setuptools build) even for a download. With setuptools importable here
    that runs without build isolation (~10 s instead of ~1 min: no isolated environment to install); if that
    fails, pip's default isolated build is tried.
    """
    archive = dest / f"transformers-{version}.tar.gz"
    attempts = [False, True] if importlib.util.find_spec("setuptools") else [True]
    errors = []
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        for build_isolation in attempts:
            proc = _pip_download(version, tmp, build_isolation)
            got = Path(tmp) / archive.name
            if proc.returncode == 0 and got.is_file():
                os.replace(got, archive)
                return archive
            errors.append(f"$ {' '.join(proc.args)}\nexit code {proc.returncode}\n{proc.stderr.strip()[-3000:]}")
    raise TransformersTestHelpersError(
        f"could not download the Transformers {version} source distribution, which holds the common model tests "
        "the hf-kan model tests run:\n" + "\n".join(errors)
        + f"\nThe package index must be reachable (or the cache {dest} filled)."
    )


def _extract(archive: Path, version: str, names: list[str], package_dir: Path) -> None:
    """Extract ``tests/<name>`` for each of ``names`` from the sdist ``archive`` into ``package_dir``."""
    with tarfile.open(archive) as tar:
        for name in names:
            member = f"transformers-{version}/tests/{name}"
            try:
                data = tar.extractfile(member)
            except KeyError:
                data = None
            if data is None:
                raise TransformersTestHelpersError(f"{archive} has no {member}: the helper layout changed")
            tmp = package_dir / f".{name}.tmp"
            tmp.write_bytes(data.read())
            os.replace(tmp, package_dir / name)


def helpers_dir(version: str | None = None) -> Path:
    """Directory holding the package ``transformers_common_tests`` for Transformers ``version`` (default: the
    installed one), downloading and extracting on first use."""
    version = version or importlib.metadata.version("transformers")
    root = cache_root() / version
    package_dir = root / PACKAGE
    if all((package_dir / name).is_file() for name in (*HELPER_FILES, "__init__.py")):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        package_dir.mkdir(exist_ok=True)
        missing = [name for name in HELPER_FILES if not (package_dir / name).is_file()]
        if missing:
            archive = root / f"transformers-{version}.tar.gz"
            if not archive.is_file():
                archive = _download_sdist(version, root)
            _extract(archive, version, missing, package_dir)
        (package_dir / "__init__.py").write_text(f'"""Common-test helpers of the Transformers {version} sdist."""\n')
    return root


def load_transformers_test_helpers() -> types.SimpleNamespace:
    """Import the common-test helpers of the installed Transformers; return their public pieces:
    ``ModelTesterMixin``, ``ConfigTester``, ``BackboneTesterMixin``, ``floats_tensor``, ``ids_tensor``."""
    root = helpers_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    package = importlib.import_module(PACKAGE)
    for dotted in STAND_IN_MODULES:  # the relative imports the helpers make of modules the sdist lacks
        parent = dotted.split(".")[0]
        if f"{PACKAGE}.{parent}" not in sys.modules:
            sys.modules[f"{PACKAGE}.{parent}"] = types.ModuleType(f"{PACKAGE}.{parent}")
        sys.modules[f"{PACKAGE}.{dotted}"] = transformers_test_stand_ins
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    backbone = importlib.import_module(f"{PACKAGE}.test_backbone_common")
    return types.SimpleNamespace(
        package=package,
        ModelTesterMixin=modeling.ModelTesterMixin,
        floats_tensor=modeling.floats_tensor,
        ids_tensor=modeling.ids_tensor,
        ConfigTester=configuration.ConfigTester,
        BackboneTesterMixin=backbone.BackboneTesterMixin,
    )


__all__ = ["TransformersTestHelpersError", "cache_root", "helpers_dir", "load_transformers_test_helpers"]
