"""The hf-kan model for lmms-eval (imports ``lmms_eval``; registered through the ``lmms_eval.models`` entry point).

Usage::

    lmms-eval --model hf_kan --model_args pretrained=<dir or Hub id>,prune=fastv \\
        --tasks hf_kan_digits --include_path "$(hf-kan lmms-tasks)"

Model arguments: ``pretrained`` (required); the patch settings ``mma``, ``var``, ``prune``, ``dyvte`` (each
``true`` / ``false`` / a preset name such as ``fastv`` / a JSON object of options, e.g.
``prune={"method":"fastv","keep_ratios":[0.25]}``; omitted = as saved in the checkpoint); ``dtype`` (``float32``,
``bfloat16``, ``auto``, ...); ``max_new_tokens`` (default answer length when a task sets none); ``efficiency``
(record per-document efficiency figures, default true). lmms-eval's ``--batch_size N`` and ``--device`` are honoured.

Every request goes through :class:`hf_kan.eval.runner.Runner`, the same code as ``hf_kan.eval.evaluate_task``, so both
give the same answers on the same samples. Each answered document's efficiency record is handed to the hf-kan tasks
(``hf_kan.eval.lmms_records``), which report it as task metrics. ``loglikelihood`` is refused while pruning or DyVTE
is active (``UnsupportedModelError``; see ``Runner.loglikelihood``).

Several processes: ``accelerate launch --multi_gpu --num_processes N -m lmms_eval ...``. On machines without GPUs,
also set ``ACCELERATE_USE_CPU=1`` so that lmms-eval's own ``Accelerator`` (created before any model) joins the
processes into one gloo group; without it this class raises a clear error instead of evaluating every document N
times. The process group is shut down when the interpreter exits (a gloo group left alive can hang at exit).
"""

from __future__ import annotations

import atexit
import itertools
import os
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm
from transformers.utils import logging

from ..errors import HFKanConfigError, UnsupportedModelError
from . import lmms_records
from .runner import EvalSample, Runner
from .settings import PATCH_NAMES, PatchSetting, parse_patch_value

logger = logging.get_logger(__name__)

#: lmms-eval generation arguments passed on to ``model.generate`` (``until`` and ``max_new_tokens`` are handled apart)
_GENERATE_KEYS = ("do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty")


def _shutdown_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _generate_arguments(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> tuple[int, list[str], dict]:
    """(max_new_tokens, until, generate kwargs) from an lmms-eval request's generation arguments."""
    gen_kwargs = dict(gen_kwargs or {})
    until = gen_kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(gen_kwargs.pop("max_new_tokens", None) or default_max_new_tokens)
    kwargs = {k: gen_kwargs[k] for k in _GENERATE_KEYS if gen_kwargs.get(k) is not None}
    temperature = float(kwargs.get("temperature", 0.0))
    if temperature > 0 and "do_sample" not in kwargs:
        kwargs["do_sample"] = True
    if not kwargs.get("do_sample"):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")}
        kwargs["do_sample"] = False
    return max_new, until, kwargs


class HFKanLMMS(lmms):
    """lmms-eval model backed by :class:`hf_kan.eval.runner.Runner` (see the module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str, mma: Any = None, var: Any = None, prune: Any = None, dyvte: Any = None,
                 batch_size: int | str = 1, max_batch_size: Any = None, device: str | None = None,
                 dtype: str | None = None, max_new_tokens: int = 16, efficiency: bool = True, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise HFKanConfigError(
                f"unknown model_args {sorted(kwargs)} for --model hf_kan; accepted: pretrained, "
                f"{', '.join(PATCH_NAMES)}, dtype, max_new_tokens, efficiency (and lmms-eval's batch_size, device)"
            )
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise HFKanConfigError(f"--batch_size must be an integer for --model hf_kan, got {batch_size!r}") from None
        from ..train.runtime import make_accelerator

        self.accelerator = make_accelerator()
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes != launched:
            raise HFKanConfigError(
                f"this is one of {launched} launched processes, but lmms-eval's Accelerator runs them as separate "
                "single-process jobs (a multi-process launch on a machine without GPUs). Set ACCELERATE_USE_CPU=1 "
                "(e.g. `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m lmms_eval ...`) so "
                "they form one gloo group."
            )
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if self._world_size > 1:
            atexit.register(_shutdown_process_group)
        target = self.accelerator.device if device is None or self._world_size > 1 else torch.device(device)
        setting = PatchSetting(name="model_args", **{name: parse_patch_value(name, value) for name, value in
                                                     (("mma", mma), ("var", var), ("prune", prune),
                                                      ("dyvte", dyvte))})
        self.runner = Runner.from_pretrained(str(pretrained), setting=setting, dtype=dtype, device=target,
                                             batch_size=batch_size, max_new_tokens=int(max_new_tokens),
                                             efficiency=parse_patch_value("efficiency", efficiency) is not False)
        self.batch_sizes = {"hf_kan": batch_size}

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def model(self):
        return self.runner.model

    # ------------------------------------------------------------------------------------------------- helpers
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _sample(self, context: str, doc_to_visual, task: str, split: str, doc_id: int) -> EvalSample:
        doc = self._doc(task, split, doc_id)
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        return EvalSample(question=context, images=self._images(visuals), id=doc.get("id", doc_id),
                          meta={"task": task, "doc_id": doc_id})

    @staticmethod
    def _images(visuals) -> list:
        from PIL import Image

        images = []
        for v in visuals or []:
            if not isinstance(v, Image.Image):
                raise UnsupportedModelError(
                    f"--model hf_kan takes image inputs (PIL images); this task gives {type(v).__name__} "
                    "(video and audio inputs are not supported)"
                )
            images.append(v.convert("RGB"))
        return images

    def _file_records(self, samples: list[EvalSample], generations) -> None:
        for sample, gen in zip(samples, generations):
            if gen.efficiency is not None:
                lmms_records.put(sample.meta["task"], sample.id, gen.efficiency.as_dict())

    # ------------------------------------------------------------------------------------------------- requests
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; consecutive requests with equal generation arguments are batched."""
        out: list[str] = []
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="hf_kan generate")
        start = 0
        while start < len(requests):
            key = repr(sorted(requests[start].args[1].items(), key=lambda kv: kv[0]))
            end = start + 1
            while end < len(requests) and repr(sorted(requests[end].args[1].items(), key=lambda kv: kv[0])) == key:
                end += 1
            chunk = [r.args for r in requests[start:end]]
            max_new, until, kwargs = _generate_arguments(chunk[0][1], self.runner.max_new_tokens)
            samples = [self._sample(ctx, visual, task, split, doc_id) for ctx, _, visual, doc_id, task, split in chunk]
            generations = self.runner.generate(samples, max_new_tokens=max_new, until=until, **kwargs)
            self._file_records(samples, generations)
            out += [g.text for g in generations]
            pbar.update(end - start)
            start = end
        pbar.close()
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request; refused under pruning / DyVTE."""
        samples, continuations = [], []
        for context, target, visual, doc_id, task, split in (r.args for r in requests):
            samples.append(self._sample(context, visual, task, split, doc_id))
            continuations.append(target if isinstance(target, str) else target(self._doc(task, split, doc_id)))
        return self.runner.loglikelihood(samples, continuations)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round generation: round 0 answers the context; each later round asks the task's ``doc_to_text``
        (with the previous answers) for the next visuals and context, until it signals the end."""
        out = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in (r.args for r in requests):
            max_new, until, kwargs = _generate_arguments(gen_kwargs, self.runner.max_new_tokens)
            doc = self._doc(task, split, doc_id)
            sample = self._sample(context, doc_to_visual, task, split, doc_id)
            answers: list[str] = []
            info = None
            for round_idx in itertools.count():
                if round_idx:
                    visuals, context, terminal, _, info = doc_to_text(doc, previous_output=answers, round_idx=round_idx,
                                                                      previous_round_info=info)
                    if terminal:
                        break
                    sample = EvalSample(question=context, images=self._images(visuals), id=sample.id, meta=sample.meta)
                answers.append(self.runner.generate([sample], max_new_tokens=max_new, until=until, **kwargs)[0].text)
            out.append(answers)
        return out


__all__ = ["HFKanLMMS"]
