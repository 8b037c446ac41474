"""Metric modules shipped with hf-kan, loaded by path through ``evaluate`` (no Hub download).

Each metric is a folder ``<name>/<name>.py`` defining an ``evaluate.Metric``; :func:`load_metric` loads it with
``evaluate.load(<folder>)``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from ...errors import HFKanConfigError


def available_metrics() -> list[str]:
    """Names of the shipped metric modules."""
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> str:
    """Filesystem path of the shipped metric folder ``name`` (what ``evaluate.load`` takes)."""
    folder = resources.files(__name__) / name
    if not (folder / f"{name}.py").is_file():
        raise HFKanConfigError(f"unknown metric {name!r}; hf-kan ships {available_metrics()}")
    return str(folder)


def load_metric(name: str, **load_kwargs: Any):
    """``evaluate.load`` of the shipped metric ``name`` (in memory, no cache files unless ``load_kwargs`` say so)."""
    import evaluate

    load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **load_kwargs)


__all__ = ["available_metrics", "load_metric", "metric_path"]
