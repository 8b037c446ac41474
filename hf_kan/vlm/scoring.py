"""Answer accuracy of a vision-language model on Shapes VQA, per question type.

A sample is correct when the model's greedy prediction reproduces every answer token: with the answer given as
teacher-forced input, ``argmax logits[t - 1] == answer[t]`` for each answer token ``t`` (the closing ``</s>`` is
not scored). This equals "greedy generation starts with the answer" and needs one forward per batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .batches import IGNORE_INDEX


def answer_token_mask(labels: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Positions of ``labels`` that hold answer tokens (labelled and not ``</s>``)."""
    return (labels != IGNORE_INDEX) & (labels != eos_token_id)


@torch.no_grad()
def score_batch(model: Any, batch: dict[str, Any], eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample correctness (bool ``[B]``) and summed answer cross-entropy (``[B]``, answer and ``</s>``) of
    ``batch`` (made by :class:`~hf_kan.vlm.batches.VQACollator`)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "question_type")}
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    # the prediction for position t is made at t - 1
    logits, targets = logits[:, :-1], labels[:, 1:]
    scored = targets != IGNORE_INDEX
    answer = answer_token_mask(targets, eos_token_id)
    wrong = (logits.argmax(-1) != targets) & answer
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets.masked_fill(~scored, 0), reduction="none"
    ).masked_fill(~scored, 0.0)
    return ~wrong.any(-1), losses.sum(-1)


def summarize(correct: Iterable[bool], kinds: Iterable[str], losses: Iterable[float] | None = None,
              main_types: Iterable[str] | None = None) -> dict[str, Any]:
    """``{"accuracy": {type: acc, ..., "mean": mean over main_types, "overall": pooled}, "count": {...},
    "loss": mean}`` from per-sample results. ``main_types`` (default: all types seen) enter the mean."""
    correct, kinds = list(correct), list(kinds)
    per_type: dict[str, list[bool]] = {}
    for c, k in zip(correct, kinds):
        per_type.setdefault(k, []).append(bool(c))
    accuracy = {k: sum(v) / len(v) for k, v in per_type.items()}
    main = [k for k in (main_types or per_type) if k in accuracy]
    accuracy["mean"] = sum(accuracy[k] for k in main) / max(len(main), 1)
    accuracy["overall"] = sum(correct) / max(len(correct), 1)
    result: dict[str, Any] = {"accuracy": accuracy, "count": {k: len(v) for k, v in per_type.items()}}
    if losses is not None:
        losses = list(losses)
        result["loss"] = sum(losses) / max(len(losses), 1)
    return result


__all__ = ["answer_token_mask", "score_batch", "summarize"]
