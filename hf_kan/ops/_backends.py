"""What the op dispatchers (``ops.rational``, ``ops.attention``) share: whether Triton can run and which backend a
call asks for (its argument, else an environment variable, else ``"auto"``)."""

from __future__ import annotations

import functools
import importlib.util
import os

from ..errors import BackendUnavailableError


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it). Cached: dispatchers ask per call, and
    a failed ``find_spec`` searches the whole path (about 0.4 ms)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def requested_backend(backend: str | None, env_var: str, choices: tuple[str, ...], what: str,
                      argument: str = "the backend argument") -> str:
    """The ``what`` backend asked for: ``backend`` unless ``None``/``"auto"``, else ``env_var``, else ``"auto"``;
    a name outside ``choices`` raises :class:`BackendUnavailableError` naming where it came from."""
    from_env = backend in (None, "auto")
    name = ((os.environ.get(env_var) or "auto") if from_env else backend).strip().lower()
    if name not in choices:
        source = env_var if from_env else argument
        raise BackendUnavailableError(f"unknown {what} backend {name!r} (from {source}); choose one of "
                                      f"{', '.join(choices)}")
    return name
