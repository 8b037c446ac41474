"""``hf-kan eval``: what each hf-kan patch costs and buys on a vision-language model, as one table and one plot.

    hf-kan eval                                   # the shipped Shapes VQA model, default settings
    hf-kan eval path/to/model --limit 1000 --output-dir outputs/eval
    hf-kan eval DIR --setting off --setting 'fastv-75=prune={"method":"fastv","keep_ratios":[0.75]}'

The model (default: the one shipped in the package, ``hf_kan.vlm.pretrained_path()``; or any local directory of a
family ``hf_kan.patches`` supports) answers the first ``--limit`` rows of a task's test split (default
``hf_kan_shapes_vqa``) once per patch setting, through :func:`hf_kan.eval.evaluate_task` (the lmms-free
:class:`~hf_kan.eval.Runner`, batched, answers scored by the shipped ``answer_accuracy`` metric module). The default
settings (:func:`default_settings`) each turn on one method, every other patch off:

- ``unpatched``: every patch off (the reference of every ratio);
- ``fastv-50`` / ``fastv-25``: FastV at layer ``K = 2`` (the layer before the last in shallower models) keeping 50 % /
  25 % of the visual tokens;
- ``pdrop``: PyramidDrop's three stages (50 / 25 / 12.5 %) at a quarter, half and three quarters of the depth;
- ``fastv-50+debias``: ``fastv-50`` with attention debiasing by the positional trend stored in the checkpoint;
- ``dyvte``: the checkpoint's trained DyVTE routers;
- ``var``: VAR with the checkpoint's sink dimensions;
- ``mma``: modality-mutual attention, only for a model trained with it (the other settings then keep it on).

A setting whose calibration the checkpoint lacks (no fitted trend, no routers, no sink dimensions, not trained with
MMA) is skipped with the reason logged and listed in the outputs; ``hf-kan vlm-package`` (or ``hf-kan
calibrate-prune`` / ``calibrate-var`` / ``dyvte-train``) stores them.

Columns: accuracy per group (question type) and overall; visual tokens kept after the last layer and the
visual-token budget (mean over decoder layers of the fraction of visual tokens present); prefill FLOPs and KV-cache
bytes of each sample's own prefill (means; analytical, ``hf_kan.patches.efficiency_report``) and their ratio to
``unpatched``; measured prefill and per-token decode latency relative to ``unpatched``: after the accuracy pass, the
same batch of ``--timing-batch`` samples is generated ``--timing-rounds`` times per setting, the settings interleaved
(order reversed every other round), ``--timing-new-tokens`` tokens each; the ratio is the median over rounds of
(setting / unpatched in the same round). Writes ``eval.json`` (table, skipped settings, per-sample answers),
``eval.csv`` (the table) and ``eval.png`` (accuracy against the visual-token budget, one line per method) to
``--output-dir``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers.utils import logging

from ..errors import HFKanConfigError
from .settings import PatchSetting, patch_names

logger = logging.get_logger(__name__)

DEFAULT_TASK = "hf_kan_shapes_vqa"
#: rows of the test split evaluated by default: the README's command 1 runs in about a minute on 2 CPU cores
DEFAULT_LIMIT = 250
REFERENCE = "unpatched"
FASTV_LAYER = 2
PDROP_RATIOS = (0.5, 0.25, 0.125)


@dataclass(frozen=True)
class PlannedSetting:
    """One row of the report: a setting, the method it belongs to (one plot line per method) and, when it cannot
    run on this model, why (``skip``)."""

    setting: PatchSetting
    method: str
    skip: str | None = None


def default_settings(model: Any) -> list[PlannedSetting]:
    """The default settings for ``model`` (see the module docstring), with those needing a calibration the
    checkpoint lacks marked as skipped."""
    from .. import patches

    saved = patches.status(model)["patches"]
    num_layers = int(model.config.get_text_config().num_hidden_layers)
    if num_layers < 2:
        raise HFKanConfigError(f"the text model has {num_layers} decoder layer(s); token pruning needs at least 2")
    base = {**dict.fromkeys(patch_names(), False), "mma": saved.get("mma") or False}

    def setting(name: str, **values: Any) -> PatchSetting:
        return PatchSetting(name=name, patches={**base, **values})

    layer = min(FASTV_LAYER, num_layers - 1)
    fastv = {"method": "fastv", "layers": [layer]}
    pdrop_layers = sorted({min(max(round(num_layers * f), 1), num_layers - 1) for f in (0.25, 0.5, 0.75)})
    pdrop = {"method": "pdrop", "layers": pdrop_layers, "keep_ratios": list(PDROP_RATIOS[:len(pdrop_layers)])}
    plans = [PlannedSetting(PatchSetting.off(REFERENCE), REFERENCE)]
    if saved.get("mma"):
        plans.append(PlannedSetting(setting("mma"), "mma"))
    else:
        plans.append(PlannedSetting(setting("mma", mma=True), "mma",
                                    "the model was not trained with MMA (it changes what the model computes)"))
    plans += [
        PlannedSetting(setting("fastv-50", prune={**fastv, "keep_ratios": [0.5]}), "fastv"),
        PlannedSetting(setting("fastv-25", prune={**fastv, "keep_ratios": [0.25]}), "fastv"),
        PlannedSetting(setting("pdrop", prune=pdrop), "pdrop"),
    ]
    prune = saved.get("prune") or {}
    trend = prune.get("trend") if prune.get("debias") else None
    debias = setting("fastv-50+debias", prune={**fastv, "keep_ratios": [0.5], "debias": {"trend": trend or 0.0}})
    plans.append(PlannedSetting(debias, "fastv+debias", None if trend else
                                "no fitted positional trend in the checkpoint (hf-kan calibrate-prune MODEL --save)"))
    plans.append(PlannedSetting(setting("dyvte", dyvte=saved.get("dyvte") or True), "dyvte", None if saved.get("dyvte")
                                else "no trained DyVTE routers in the checkpoint (hf-kan vlm-package, dyvte-train)"))
    var = saved.get("var") or {}
    plans.append(PlannedSetting(setting("var", var=var or True), "var", None if var.get("sink_dims") else
                                "no VAR sink dimensions in the checkpoint (hf-kan calibrate-var MODEL --save)"))
    return plans


def parse_setting(text: str) -> PlannedSetting:
    """A ``--setting`` value: ``NAME=SPEC`` (``SPEC`` as :meth:`PatchSetting.parse` reads it, e.g.
    ``fastv-75=prune={...}``) or a bare ``SPEC`` named after itself. Its method is its name up to the first ``-``."""
    name, sep, spec = text.partition("=")
    if not sep or name.strip() in patch_names():
        name, spec = text.strip(), text
    return PlannedSetting(PatchSetting.parse(spec, name=name.strip()), name.strip().split("-")[0])


def time_settings(runner: Any, samples: Sequence[Any], settings: Sequence[PatchSetting], rounds: int,
                  new_tokens: int) -> dict[str, dict[str, float]]:
    """Interleaved latency of ``settings`` on one batch: per round every setting generates ``new_tokens`` tokens for
    ``samples`` (order reversed every other round); returns per setting the median prefill seconds and decode seconds
    per token, and their medians over rounds of the ratio to ``settings[0]`` in the same round."""
    if new_tokens < 2:
        raise HFKanConfigError(f"--timing-new-tokens must be >= 2 (one prefill, then decode steps), got {new_tokens}")
    names = [s.name for s in settings]
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    efficiency, progress = runner.efficiency, runner.progress
    runner.efficiency, runner.progress = False, False
    try:
        for r in range(rounds + 1):  # round 0 warms every setting up and is not counted
            order = list(settings) if r % 2 else list(reversed(settings))
            for setting in order:
                runner.apply(setting)
                timing = runner.generate(samples, max_new_tokens=new_tokens, min_new_tokens=new_tokens)[0].timing
                if r:
                    times[setting.name].append((timing["prefill_s"],
                                                timing["decode_s"] / max(timing["new_tokens"] - 1, 1)))
    finally:
        runner.efficiency, runner.progress = efficiency, progress
    reference = times[names[0]]
    out = {}
    for name in names:
        prefill, decode = zip(*times[name])
        out[name] = {
            "prefill_ms": 1e3 * statistics.median(prefill),
            "decode_ms_per_token": 1e3 * statistics.median(decode),
            "prefill_latency_ratio": statistics.median(p / ref[0] for p, ref in zip(prefill, reference)),
            "decode_latency_ratio": statistics.median(d / ref[1] for d, ref in zip(decode, reference)),
        }
    return out


def table_rows(results: Sequence[Any], methods: Sequence[str], timings: dict[str, dict[str, float]],
               metric: str = "answer_accuracy") -> list[dict[str, Any]]:
    """One flat row per evaluated setting: accuracies, efficiency means, ratios to the first row, latencies."""
    rows = []
    for result, method in zip(results, methods):
        m = result.metrics
        row: dict[str, Any] = {"setting": result.setting["name"], "method": method}
        row.update({f"accuracy/{k.split('/', 1)[1]}": v for k, v in m.items() if k.startswith(f"{metric}/")})
        row["accuracy"] = m[metric]
        for key in ("visual_tokens", "visual_tokens_kept", "visual_token_budget", "prefill_flops", "kv_cache_bytes"):
            row[key] = m.get(key, float("nan"))
        rows.append(row)
    ref = rows[0]
    for row in rows:
        row["prefill_flops_ratio"] = row["prefill_flops"] / ref["prefill_flops"]
        row["kv_cache_ratio"] = row["kv_cache_bytes"] / ref["kv_cache_bytes"]
        row.update(timings.get(row["setting"], {}))
    return rows


_SHORT = {"visual_tokens_kept": "vis kept", "visual_token_budget": "budget", "prefill_flops_ratio": "FLOPs",
          "kv_cache_ratio": "KV", "prefill_latency_ratio": "prefill t", "decode_latency_ratio": "decode t"}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The report table as text (accuracies, kept visual tokens, budget, and FLOPs / KV-cache / latency ratios to
    the unpatched row)."""
    if not rows:
        return ""
    accuracy = [k for k in rows[0] if k.startswith("accuracy/")]
    columns = ["setting", *accuracy, "accuracy", *[k for k in _SHORT if k in rows[0]]]
    header = [c.split("/", 1)[1] if c.startswith("accuracy/") else _SHORT.get(c, c) for c in columns]
    header[header.index("accuracy")] = "overall"
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row[c]
            cells.append(v if isinstance(v, str) else f"{v:.1f}" if c == "visual_tokens_kept" else f"{v:.3f}"
                         if c.startswith("accuracy") or c == "visual_token_budget" else f"{v:.2f}")
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(line, widths)))
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_budget(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """PNG of overall accuracy against the visual-token budget: one line per method (its settings sorted by budget),
    the unpatched model as a star and a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ref = rows[0]
    ax.axhline(ref["accuracy"], color="grey", linestyle=":", linewidth=1)
    ax.plot([ref["visual_token_budget"]], [ref["accuracy"]], marker="*", markersize=12, color="black",
            linestyle="none", label=ref["setting"])
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        points = sorted((r["visual_token_budget"], r["accuracy"]) for r in rows[1:] if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    ax.set_xlabel("visual-token budget (mean fraction of visual tokens per decoder layer)")
    ax.set_ylabel("accuracy (overall)")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict[str, Any], output_dir: str) -> dict[str, str]:
    """Write ``eval.json`` (``report``), ``eval.csv`` (``report["rows"]``) and ``eval.png``; returns their paths.
    Without matplotlib (the ``plot`` extra) the PNG is skipped with a warning and left out of the result."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {ext: os.path.join(output_dir, f"eval.{ext}") for ext in ("json", "csv", "png")}
    with open(paths["json"], "w") as handle:
        json.dump(report, handle, indent=2)
    rows = report["rows"]
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed, so eval.png was not written; install it with "
                       "`pip install 'hf-kan[plot]'` (the table is in eval.json and eval.csv)")
        del paths["png"]
        return paths
    plot_budget(rows, paths["png"], title=f"{report['task']}, {report['num_samples']} samples")
    return paths


def evaluate_patches(model_path: str | None = None, *, task: str = DEFAULT_TASK, limit: int | None = DEFAULT_LIMIT,
                     settings: Sequence[PlannedSetting] | None = None, batch_size: int = 16,
                     timing_rounds: int = 5, timing_batch: int = 16, timing_new_tokens: int = 4,
                     rational_backend: str | None = "reference", progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model_path`` (default: the shipped model) on ``task`` under ``settings`` (default:
    :func:`default_settings`); returns the report (``rows``, ``skipped``, per-sample ``samples``, ...) that
    :func:`write_outputs` writes. ``rational_backend`` (``None``: as configured) is set on a KAT tower's rational
    activations (:func:`hf_kan.vlm.modeling.use_rational_backend`)."""
    from .. import models  # noqa: F401  (registers the KAT vision tower)
    from .evaluation import evaluate_task
    from .runner import Runner
    from .tasks import get_task, task_samples

    if model_path is None:
        from ..vlm.pretrained import pretrained_path

        model_path = str(pretrained_path())
    runner = Runner.from_pretrained(model_path, batch_size=batch_size, progress=progress)
    if rational_backend is not None:
        from ..vlm.modeling import use_rational_backend

        use_rational_backend(runner.model, rational_backend)
    plans = list(settings) if settings is not None else default_settings(runner.model)
    for plan in plans:
        if plan.skip:
            logger.info(f"skipping setting {plan.setting.name!r}: {plan.skip}")
    run = [p for p in plans if not p.skip]
    if not run:
        raise HFKanConfigError("no patch setting left to evaluate")
    results = []
    for plan in run:  # one evaluate_task call per setting, so the progress bar names the setting
        if progress:
            logger.info(f"evaluating {plan.setting.name}")
        results += evaluate_task(runner, task, [plan.setting], limit=limit)
    timing_samples = task_samples(task, limit=timing_batch)
    timings = time_settings(runner, timing_samples, [p.setting for p in run], timing_rounds, timing_new_tokens) \
        if timing_rounds > 0 else {}
    runner.apply(run[0].setting)
    spec = get_task(task)
    rows = table_rows(results, [p.method for p in run], timings, metric=spec.metric)
    return {
        "model": str(model_path),
        "task": task,
        "split": results[0].split,
        "num_samples": results[0].num_samples,
        "batch_size": batch_size,
        "timing": {"rounds": timing_rounds, "batch": len(timing_samples), "new_tokens": timing_new_tokens,
                   "reference": run[0].setting.name},
        "settings": {p.setting.name: p.setting.as_dict() for p in run},
        "rows": rows,
        "skipped": [{"setting": p.setting.name, "method": p.method, "reason": p.skip} for p in plans if p.skip],
        "samples": {r.setting["name"]: [_sample_record(s, spec.group_by) for s in r.samples] for r in results},
    }


def _sample_record(sample: dict[str, Any], group_by: str | None) -> dict[str, Any]:
    record = {k: sample[k] for k in ("id", "prediction", "answer", "score")}
    if group_by:
        record[group_by] = sample["meta"].get(group_by)
    return record


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    settings = [parse_setting(s) for s in args.setting] if args.setting else None
    if settings is not None and settings[0].setting.patches != PatchSetting.off().patches:
        settings.insert(0, PlannedSetting(PatchSetting.off(REFERENCE), REFERENCE))
    report = evaluate_patches(getattr(args, "model", None), task=args.task, limit=args.limit or None, settings=settings,
                              batch_size=args.batch_size, timing_rounds=args.timing_rounds,
                              timing_batch=args.timing_batch, timing_new_tokens=args.timing_new_tokens,
                              rational_backend=args.rational_backend, progress=not args.no_progress_bar)
    paths = write_outputs(report, args.output_dir)
    print(f"{report['task']} ({report['split']}): {report['num_samples']} samples, model {report['model']}")
    print(format_table(report["rows"]))
    print(f"budget: mean fraction of the visual tokens present per decoder layer; FLOPs, KV: prefill FLOPs and "
          f"KV-cache bytes / {REFERENCE}; prefill t, decode t: measured latency / {REFERENCE} (median of "
          f"{report['timing']['rounds']} interleaved rounds, batch {report['timing']['batch']})")
    for skipped in report["skipped"]:
        print(f"skipped {skipped['setting']}: {skipped['reason']}")
    print(f"wrote {', '.join(paths.values())}")
    return 0


def add_subparser(subparsers: Any) -> None:
    """Register ``hf-kan eval``."""
    from ..cli import DefaultsHelpFormatter

    parser = subparsers.add_parser(
        "eval", help="evaluate a VLM (default: the shipped one) under each patch: accuracy, tokens, FLOPs, latency",
        description=__doc__.split("\n\n")[0] + " Default settings: unpatched, mma (a model trained with MMA only), "
        "fastv-50, fastv-25, pdrop, fastv-50+debias, dyvte, var; one whose calibration the model lacks is skipped with "
        "the reason. Writes eval.json, eval.csv and eval.png. README: sections 'Two commands' and 'hf-kan eval'.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                        help="a local model directory of a supported family (default: the shipped Shapes VQA model)")
    parser.add_argument("--task", default=DEFAULT_TASK, help="a shipped evaluation task")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                        help="evaluate the first N rows of the test split (0: all)")
    parser.add_argument("--setting", action="append", default=None,
                        help="a patch setting, repeatable: NAME=SPEC or SPEC ('off', 'prune=fastv', "
                             "'fastv-75=prune={\"method\":\"fastv\",\"keep_ratios\":[0.75]}'); the unpatched "
                             "reference is added first. unset: the default settings above")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per generate call")
    parser.add_argument("--timing-rounds", type=int, default=5, help="interleaved timing rounds (0: no timing)")
    parser.add_argument("--timing-batch", type=int, default=16, help="samples in the timed batch")
    parser.add_argument("--timing-new-tokens", type=int, default=4, help="tokens generated per timed call")
    parser.add_argument("--output-dir", default="outputs/hf-kan-eval", help="where eval.json/csv/png go")
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--rational-backend", default="reference",
                        help="backend of a KAT tower's rational activations ('auto' compiles the CPU kernels for "
                             "large batches: tens of seconds of compiling to save milliseconds here)")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.set_defaults(func=_run)


__all__ = ["DEFAULT_LIMIT", "DEFAULT_TASK", "PlannedSetting", "add_subparser", "default_settings",
           "evaluate_patches", "format_table", "parse_setting", "plot_budget", "table_rows", "time_settings",
           "write_outputs"]
