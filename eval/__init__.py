"""Evaluation of vision-language models with hf-kan patches, shipped as ``hf_kan.eval``.

- :class:`Runner` (``runner.py``): load a model with patches, batched left-padded ``generate``, ``loglikelihood``
  and a per-sample efficiency record (visual tokens kept, prefill FLOPs, KV-cache bytes, timings). No lmms-eval.
- :func:`evaluate_task` (``evaluation.py``): a shipped task under a list of :class:`PatchSetting` s, metrics through
  the ``evaluate`` modules in ``metrics/``, one or several processes (``accelerate launch``).
- ``hf-kan eval`` (``patch_report.py``): one model under the default patch settings (or given ones) on a task, as
  one table of accuracy, kept visual tokens, FLOPs, KV cache and interleaved latency ratios, written as JSON, CSV
  and a plot of accuracy against the visual-token budget.
- Tasks (``tasks/``): a registry of :class:`TaskSpec` s and their lmms-eval YAMLs (:func:`include_path`).
- lmms-eval: ``--model hf_kan`` (``lmms_model.py``, registered by the entry point in ``lmms_plugin.py``) and the task
  class ``lmms_task.py``; both import lmms-eval, nothing else here does.

Names are imported on first use, so ``import hf_kan.eval`` stays cheap (lmms-eval imports ``hf_kan.eval.lmms_plugin``
at its own start-up).
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_EXPORTS = {
    "EfficiencyRecord": ".runner",
    "EvalSample": ".runner",
    "Generation": ".runner",
    "Runner": ".runner",
    "load_model": ".runner",
    "PatchSetting": ".settings",
    "EFFICIENCY_METRICS": ".evaluation",
    "TaskResult": ".evaluation",
    "evaluate_task": ".evaluation",
    "TaskSpec": ".tasks",
    "available_tasks": ".tasks",
    "get_task": ".tasks",
    "include_path": ".tasks",
    "register_task": ".tasks",
    "task_samples": ".tasks",
    "load_metric": ".metrics",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
