"""Per-sample efficiency records handed from the hf-kan lmms-eval model to the hf-kan lmms-eval tasks.

lmms-eval gives a task's ``process_results(doc, results)`` only the model's answer text; the model and the task share
no object. The hf-kan model therefore files each answered document's efficiency record here, keyed by
``(task name, document id)``, and the hf-kan tasks take it back when scoring that document (both run in the same
process: lmms-eval scores each document on the rank that answered it). Records are removed when taken.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()
_RECORDS: dict[tuple[str, Any], dict[str, Any]] = {}


def put(task: str, doc_id: Any, record: dict[str, Any]) -> None:
    """File ``record`` for document ``doc_id`` of ``task`` (replacing an earlier one)."""
    with _LOCK:
        _RECORDS[(task, doc_id)] = record


def take(task: str, doc_id: Any) -> dict[str, Any] | None:
    """Remove and return the record of document ``doc_id`` of ``task`` (None if the model filed none)."""
    with _LOCK:
        return _RECORDS.pop((task, doc_id), None)


__all__ = ["put", "take"]
