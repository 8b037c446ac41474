"""lmms-eval task class of the tasks hf-kan ships (imports ``lmms_eval``; loaded by lmms-eval from the task YAMLs).

Each YAML in ``hf_kan/eval/tasks`` names only the task and this class::

    task: hf_kan_digits
    class: !function hf_kan.eval.lmms_task.HFKanTask

:class:`HFKanTask` builds the rest from the task's ``TaskSpec`` (``hf_kan.eval.tasks``): the data set in code (no
download), a ``generate_until`` request per document with the spec's generation settings, and per-document results:
the task metric computed by the shipped ``evaluate`` module and, when the model is hf-kan's (``--model hf_kan``),
the efficiency figures of that document's prefill (``hf_kan.eval.evaluation.EFFICIENCY_METRICS``), all averaged per
task by lmms-eval. Other models get the task metric only.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import datasets
from lmms_eval.api.task import ConfigurableTask

from . import lmms_records
from .evaluation import EFFICIENCY_METRICS
from .metrics import load_metric
from .tasks import get_task

#: efficiency metrics where lower is better (all of them: fewer tokens, FLOPs, bytes)
_LOWER_IS_BETTER = set(EFFICIENCY_METRICS)
_METRICS: dict[str, Any] = {}
_METRICS_LOCK = threading.Lock()  # lmms-eval scores documents from several threads


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def score_answer(metric: str, prediction: str, reference: str) -> float:
    """The shipped ``evaluate`` metric ``metric`` of one answer (modules are loaded once per process)."""
    with _METRICS_LOCK:
        if metric not in _METRICS:
            _METRICS[metric] = load_metric(metric)
        return float(_METRICS[metric].compute(predictions=[prediction], references=[reference])[metric])


def process_results(task: str, doc: dict, results: list, **kwargs: Any) -> dict[str, float]:
    """lmms-eval ``process_results`` of the hf-kan task ``task``: the task metric of this document's answer, plus the
    document's efficiency record when the model filed one (``hf_kan.eval.lmms_records``)."""
    spec = get_task(task)
    prediction = str(results[0] if results else "").strip()
    out = {spec.metric: score_answer(spec.metric, prediction, doc["answer"])}
    record = lmms_records.take(task, doc["id"])
    if record is not None:
        out.update({name: record[name] for name in EFFICIENCY_METRICS})
    return out


class HFKanTask(ConfigurableTask):
    """A shipped hf-kan task for lmms-eval, configured from its ``TaskSpec`` (see the module docstring)."""

    def __init__(self, config: dict | None = None, **kwargs: Any) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        self.spec = spec = get_task(config.get("task", ""))
        full = {
            "dataset_path": f"hf_kan/{spec.name}",
            "test_split": spec.split,
            "output_type": "generate_until",
            "doc_to_visual": doc_to_visual,
            "doc_to_text": "question",
            "doc_to_target": "answer",
            "generation_kwargs": {"max_new_tokens": spec.max_new_tokens, "until": list(spec.until),
                                  "do_sample": False, **spec.generation_kwargs},
            "process_results": functools.partial(process_results, spec.name),
            "metric_list": [{"metric": spec.metric, "aggregation": "mean", "higher_is_better": True}]
            + [{"metric": m, "aggregation": "mean", "higher_is_better": m not in _LOWER_IS_BETTER}
               for m in EFFICIENCY_METRICS],
            "metadata": {"version": 1.0},
            **config,
        }
        super().__init__(config=full, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        """Build the split in code (``TaskSpec.build``); nothing is downloaded."""
        split = self.spec.split
        self.dataset = datasets.DatasetDict({split: self.spec.build(split)})
        self.dataset_no_image = datasets.DatasetDict({split: self.dataset[split].remove_columns("image")})


__all__ = ["HFKanTask", "doc_to_visual", "process_results", "score_answer"]
