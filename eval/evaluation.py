"""Evaluate a :class:`~hf_kan.eval.runner.Runner` on a shipped task under a list of patch settings.

``evaluate_task`` answers every sample of the task once per setting and returns one :class:`TaskResult` per setting:
the task metric (through the ``evaluate`` module the task names), accuracies per group when the task has a
``group_by`` column, and the per-sample efficiency records averaged over samples (:data:`EFFICIENCY_METRICS`).

Several processes (``accelerate launch``): pass the ``Accelerator``; each process answers the samples
``rank::world_size`` and the rows are gathered to every process in the original order, so the metrics equal a
single-process run's on the same samples (each sample's answer does not depend on which process computed it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .runner import Runner
from .settings import PatchSetting

#: efficiency metrics averaged per task (fields of ``EfficiencyRecord``); lower is cheaper
EFFICIENCY_METRICS = ("visual_tokens", "visual_tokens_kept", "visual_token_budget", "prefill_flops", "kv_cache_bytes")
#: per-sample timing averages: each sample is charged its batch's time divided by the batch size
TIMING_METRICS = ("prefill_seconds", "decode_seconds")


@dataclass
class TaskResult:
    """Results of one task under one patch setting. ``metrics`` maps names to values: the task metric (e.g.
    ``answer_accuracy``), ``<metric>/<group>`` per group, :data:`EFFICIENCY_METRICS` and :data:`TIMING_METRICS`
    means; ``samples`` holds one dict per sample (``id``, ``prediction``, ``answer``, ``score``, ``efficiency``,
    ``timing``, ``meta``)."""

    task: str
    split: str
    setting: dict[str, Any]
    num_samples: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "split": self.split, "setting": self.setting, "num_samples": self.num_samples,
                "metrics": self.metrics, "samples": self.samples}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def summarise(task: str, split: str, setting: PatchSetting, rows: list[dict[str, Any]]) -> TaskResult:
    """Score gathered per-sample ``rows`` (``prediction``, ``answer``, ``efficiency``, ``timing``, ``meta``) with the
    task's metric module and average the efficiency and timing figures."""
    from .metrics import load_metric
    from .tasks import get_task

    spec = get_task(task)
    metric = load_metric(spec.metric)
    scored = metric.compute(predictions=[r["prediction"] for r in rows], references=[r["answer"] for r in rows],
                            return_scores=True)
    for row, score in zip(rows, scored["scores"]):
        row["score"] = score
    metrics: dict[str, float] = {spec.metric: float(scored[spec.metric])}
    if spec.group_by is not None:
        for group in sorted({str(r["meta"].get(spec.group_by)) for r in rows}):
            scores = [r["score"] for r in rows if str(r["meta"].get(spec.group_by)) == group]
            metrics[f"{spec.metric}/{group}"] = _mean(scores)
    records = [r["efficiency"] for r in rows if r["efficiency"] is not None]
    if records:
        for name in EFFICIENCY_METRICS:
            metrics[name] = _mean([rec[name] for rec in records])
    for name, key in zip(TIMING_METRICS, ("prefill_s", "decode_s")):
        metrics[name] = _mean([r["timing"][key] / r["timing"]["batch_size"] for r in rows])
    return TaskResult(task=task, split=split, setting=setting.as_dict(), num_samples=len(rows), metrics=metrics,
                      samples=rows)


def evaluate_task(runner: Runner, task: str = "hf_kan_digits", settings: Iterable[PatchSetting | str] = ("checkpoint",),
                  *, split: str | None = None, limit: int | None = None, accelerator: Any = None) -> list[TaskResult]:
    """Run ``runner`` on ``task`` once per setting (each a ``PatchSetting`` or its text form, e.g. ``"off"``,
    ``"prune=fastv"``); returns one :class:`TaskResult` per setting, in order.

    With ``accelerator`` (an ``accelerate.Accelerator`` of a multi-process launch) the samples are split over the
    processes and the results gathered; every process returns the full results.
    """
    from .tasks import get_task, task_samples

    spec = get_task(task)
    split = split or spec.split
    samples = task_samples(task, split=split, limit=limit)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    indices = list(range(rank, len(samples), world))
    shard = [samples[i] for i in indices]
    results = []
    for setting in settings:
        setting = PatchSetting.parse(setting)
        runner.apply(setting)
        generations = runner.generate(shard, max_new_tokens=spec.max_new_tokens, until=spec.until,
                                      **spec.generation_kwargs)
        rows = [
            {"index": i, "id": s.id, "prediction": g.text, "answer": s.answer, "meta": s.meta,
             "efficiency": g.efficiency.as_dict() if g.efficiency is not None else None, "timing": g.timing}
            for i, s, g in zip(indices, shard, generations)
        ]
        if world > 1:
            from accelerate.utils import gather_object

            rows = sorted(gather_object(rows), key=lambda r: r["index"])
        results.append(summarise(task, split, setting, rows))
    return results


__all__ = ["EFFICIENCY_METRICS", "TIMING_METRICS", "TaskResult", "evaluate_task", "summarise"]
