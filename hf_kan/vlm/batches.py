"""Model inputs from Shapes VQA rows, and the object-count curriculum used in training.

A row becomes the chat prompt of :func:`hf_kan.vlm.processing.prompt_text` followed by ``<answer> </s>``; the
processor expands the image placeholder and computes ``pixel_values``. ``labels`` hold the answer tokens and the
closing ``</s>`` (everything after the assistant-turn opener) and ``-100`` elsewhere, so the loss is the
cross-entropy of the answer given the image and the question. Batches are right-padded for training and scoring:
every sample then has the positions it would have alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import HFKanConfigError
from .processing import ASSISTANT_TOKEN, EOS_TOKEN, prompt_text

IGNORE_INDEX = -100


def answer_text(answer: str) -> str:
    """What follows the assistant-turn opener in a training sequence: `` <answer> </s>``."""
    return f" {answer} {EOS_TOKEN}"


class VQACollator:
    """Turn a list of rows (``image``, ``question``, ``answer``, ...) into a right-padded batch with labels.

    Returns ``input_ids``, ``attention_mask``, ``pixel_values`` and ``labels`` (answer and ``</s>`` tokens;
    ``-100`` elsewhere). ``question_type`` lists are kept under ``"question_type"`` when ``keep_types``.
    """

    def __init__(self, processor: Any, keep_types: bool = False):
        self.processor = processor
        self.keep_types = keep_types
        self.opener_id = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_TOKEN)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        texts = [prompt_text(self.processor, row["question"]) + answer_text(row["answer"]) for row in rows]
        batch = self.processor(images=[row["image"] for row in rows], text=texts, padding=True,
                               padding_side="right", return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = answer_labels(batch["input_ids"], batch["attention_mask"], self.opener_id)
        if self.keep_types:
            batch["question_type"] = [row["question_type"] for row in rows]
        return batch


def answer_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, opener_id: int) -> torch.Tensor:
    """``input_ids`` after the last ``opener_id`` of each row (where ``attention_mask`` is set), ``-100`` elsewhere."""
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    is_opener = input_ids == opener_id
    if not bool(is_opener.any(-1).all()):
        raise HFKanConfigError("a training sequence has no assistant-turn opener; was it built by VQACollator?")
    last_opener = torch.where(is_opener, positions, -1).amax(-1, keepdim=True)
    keep = (positions > last_opener) & attention_mask.bool()
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


@dataclass(frozen=True)
class CurriculumStage:
    """From optimizer step ``start`` on, train on scenes with at most ``max_objects`` objects."""

    start: int
    max_objects: int


def parse_curriculum(spec: str, total_steps: int) -> list[CurriculumStage]:
    """Parse ``"FRACTION:MAX_OBJECTS,..."`` (stage start as a fraction of ``total_steps``, increasing from 0), e.g.
    ``"0:1,0.05:2,0.1:3,0.15:6"``. An empty spec is one stage with every scene."""
    if not spec.strip():
        return [CurriculumStage(0, 6)]
    stages = []
    for item in spec.split(","):
        fraction, sep, max_objects = item.partition(":")
        try:
            stage = CurriculumStage(round(float(fraction) * total_steps), int(max_objects))
        except ValueError as err:
            raise HFKanConfigError(f"curriculum item {item!r} is not FRACTION:MAX_OBJECTS (in {spec!r})") from err
        if not sep or not 1 <= stage.max_objects <= 6:
            raise HFKanConfigError(f"curriculum item {item!r}: expected FRACTION:MAX_OBJECTS with 1 <= MAX <= 6")
        stages.append(stage)
    starts = [s.start for s in stages]
    if starts[0] != 0 or starts != sorted(starts):
        raise HFKanConfigError(f"curriculum {spec!r}: the first stage must start at 0 and starts must increase")
    return stages


class CurriculumSampler:
    """Draw training row indices (with replacement, seeded) from the rows whose scene fits the current stage.

    ``num_objects`` holds each row's object count; ``rank`` / ``world_size`` give each process its own stream.
    """

    def __init__(self, num_objects: Sequence[int], stages: list[CurriculumStage], seed: int, rank: int = 0,
                 world_size: int = 1):
        counts = np.asarray(num_objects)
        self.stages = stages
        self.pools = {s.max_objects: np.flatnonzero(counts <= s.max_objects) for s in stages}
        empty = [k for k, pool in self.pools.items() if len(pool) == 0]
        if empty:
            raise HFKanConfigError(f"no training scene has at most {empty[0]} objects; lower the curriculum stage")
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, rank, world_size]))

    def max_objects(self, step: int) -> int:
        """The object limit of the stage that holds optimizer step ``step``."""
        return [s for s in self.stages if s.start <= step][-1].max_objects

    def draw(self, step: int, batch_size: int) -> list[int]:
        pool = self.pools[self.max_objects(step)]
        return [int(i) for i in pool[self.rng.integers(len(pool), size=batch_size)]]


__all__ = [
    "IGNORE_INDEX",
    "CurriculumSampler",
    "CurriculumStage",
    "VQACollator",
    "answer_labels",
    "answer_text",
    "parse_curriculum",
]
