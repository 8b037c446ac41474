"""Process set-up and run files shared by the ``accelerate launch`` trainers (image classification, MoH, DyVTE).

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N`` starts N processes but accelerate
would treat each as a lone single-process run; :func:`make_accelerator` detects that (a distributed launch with no
CUDA/XPU device) and creates the ``Accelerator`` with ``cpu=True``, which makes the processes one gloo
(``MULTI_CPU``) group with a sharded data loader.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch


def distributed_launch_without_device() -> bool:
    """True when a launcher started several processes (``WORLD_SIZE > 1``) but there is no CUDA/XPU device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return world_size > 1 and not torch.cuda.is_available() and not has_xpu


def make_accelerator(cpu: bool = False, **accelerator_kwargs: Any) -> Any:
    """An ``accelerate.Accelerator(**accelerator_kwargs)`` on CPU (gloo) when ``cpu`` is set or when launched
    multi-process without devices (:func:`distributed_launch_without_device`), else on the default device."""
    from accelerate import Accelerator

    return Accelerator(cpu=cpu or distributed_launch_without_device(), **accelerator_kwargs)


def is_rank_zero() -> bool:
    """True in the launcher's rank-0 process (``RANK`` unset or 0); usable before an ``Accelerator`` exists."""
    return int(os.environ.get("RANK", "0")) == 0


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` as indented JSON (values JSON cannot encode are written with ``str``)."""
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)


def write_run_files(output_dir: str, metrics: dict[str, Any] | None = None, args: Any | None = None) -> None:
    """Create ``output_dir`` and write ``metrics.json`` (when ``metrics`` is given) and ``training_args.json``
    (``dataclasses.asdict(args)``, when the arguments dataclass ``args`` is given). Call on the main process only."""
    os.makedirs(output_dir, exist_ok=True)
    if metrics is not None:
        write_json(os.path.join(output_dir, "metrics.json"), metrics)
    if args is not None:
        write_json(os.path.join(output_dir, "training_args.json"), dataclasses.asdict(args))


__all__ = ["distributed_launch_without_device", "is_rank_zero", "make_accelerator", "write_json", "write_run_files"]
