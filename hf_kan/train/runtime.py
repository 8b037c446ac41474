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

from ..errors import HubUnavailableError


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


def finish(accelerator: Any, *, wait: bool = True) -> None:
    """End a run on this process: wait for the others (``wait``; skip it when leaving on an error, the others may
    be inside another collective), then ``end_training()``: trackers closed, process group destroyed. Without the
    latter a gloo group's destructor can keep rank 0 from exiting."""
    if wait:
        accelerator.wait_for_everyone()
    accelerator.end_training()


def check_hub_push(repo_id: str) -> str:
    """Fail early, with one clear message, when pushing to the Hub repo ``repo_id`` cannot work: offline mode, no
    token, or no answer from the Hub. Returns the user name the token belongs to.

    Raises :class:`hf_kan.errors.HubUnavailableError`."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    hint = f"the model would go to {repo_id!r}; drop --push-to-hub to train without uploading"
    if constants.HF_HUB_OFFLINE:
        raise HubUnavailableError(f"--push-to-hub needs the Hub but HF_HUB_OFFLINE is set; {hint}")
    token = get_token()
    if token is None:
        raise HubUnavailableError(f"--push-to-hub needs a Hugging Face token (`hf auth login` or HF_TOKEN); {hint}")
    try:
        return HfApi().whoami(token=token)["name"]
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        what = "the token was rejected" if status in (401, 403) else f"the Hub answered {status}"
        raise HubUnavailableError(f"--push-to-hub: {what} ({constants.ENDPOINT}); {hint}") from err
    except Exception as err:  # DNS failure, refused connection, timeout (types of huggingface_hub's HTTP client)
        raise HubUnavailableError(
            f"--push-to-hub: the Hub at {constants.ENDPOINT} is not reachable ({err}); {hint}"
        ) from err


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


__all__ = [
    "check_hub_push",
    "distributed_launch_without_device",
    "finish",
    "is_rank_zero",
    "make_accelerator",
    "write_json",
    "write_run_files",
]
