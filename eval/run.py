"""Command line of the lmms-free runner: evaluate a model on a shipped task under patch settings.

    python -m hf_kan.eval.run --model DIR --task hf_kan_digits --setting off --setting prune=fastv
    accelerate launch --multi_gpu --num_processes 2 -m hf_kan.eval.run --model DIR ...   # several processes

Prints one row per setting (task metric, efficiency means, timings) on the main process and, with ``--output-json``,
writes the full results (per-sample answers and records included). On a machine without GPUs a multi-process launch
joins the processes into one gloo group (``hf_kan.train.runtime.make_accelerator``); the group is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from .evaluation import EFFICIENCY_METRICS, TaskResult


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m hf_kan.eval.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local directory or Hub id of a supported VLM checkpoint")
    parser.add_argument("--task", default="hf_kan_digits", help="a shipped task (default: hf_kan_digits)")
    parser.add_argument("--setting", action="append", default=None,
                        help="patch setting, repeatable: 'off', 'checkpoint' (default) or key=value pairs such as "
                             "'prune=fastv' or 'prune={\"method\":\"fastv\",\"keep_ratios\":[0.25]},mma=false'")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the task's)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per generate call (per process)")
    parser.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, auto; default: as saved)")
    parser.add_argument("--no-efficiency", action="store_true", help="skip the per-sample efficiency records")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--output-json", default=None, help="write all results (per-sample rows included) here")
    parser.add_argument("--no-progress-bar", action="store_true")
    return parser


def format_table(results: Sequence[TaskResult]) -> str:
    """One line per setting: task metric, efficiency means and per-sample timings."""
    if not results:
        return ""
    metric_names = [m for m in results[0].metrics if m not in EFFICIENCY_METRICS and not m.endswith("_seconds")]
    columns = ["setting", *metric_names, *[m for m in EFFICIENCY_METRICS if m in results[0].metrics],
               "prefill_seconds", "decode_seconds"]
    rows = [[r.setting["name"], *[f"{r.metrics[c]:.4g}" if c in r.metrics else "-" for c in columns[1:]]]
            for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [columns, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..train.runtime import make_accelerator
    from .evaluation import evaluate_task
    from .runner import Runner

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = make_accelerator()
    try:
        runner = Runner.from_pretrained(args.model, dtype=args.dtype, device=accelerator.device,
                                        batch_size=args.batch_size, efficiency=not args.no_efficiency,
                                        progress=accelerator.is_main_process and not args.no_progress_bar)
        results = evaluate_task(runner, args.task, args.setting or ["checkpoint"], split=args.split, limit=args.limit,
                                accelerator=accelerator if accelerator.num_processes > 1 else None)
        if accelerator.is_main_process:
            print(f"{args.task}: {results[0].num_samples} samples, {accelerator.num_processes} process(es)")
            print(format_table(results))
            if args.output_json:
                with open(args.output_json, "w") as handle:
                    json.dump({"model": args.model, "num_processes": accelerator.num_processes,
                               "results": [r.as_dict() for r in results]}, handle, indent=2, default=str)
    finally:
        accelerator.end_training()  # destroys the process group of a multi-process run (else gloo can hang at exit)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
