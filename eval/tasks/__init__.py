"""Evaluation tasks shipped with hf-kan: one registry used by the lmms-free runner and by lmms-eval.

A task is a :class:`TaskSpec`: a function building a split as a ``datasets.Dataset`` with the columns ``id``,
``image`` (a PIL image), ``question`` and ``answer`` (plus any columns a ``group_by`` names), the metric scoring its
answers (a metric module shipped in ``hf_kan.eval.metrics``) and its generation settings. The same spec drives

- ``hf_kan.eval.evaluate_task`` (the runner, no lmms-eval needed), and
- lmms-eval: this folder holds one YAML file per task (``task: <name>`` plus ``class:`` pointing at
  ``hf_kan.eval.lmms_task.HFKanTask``, which builds the rest from the spec); pass the folder to lmms-eval with
  ``--include_path "$(hf-kan lmms-tasks)"`` (:func:`include_path`).

Shipped tasks:

- ``hf_kan_digits``: scikit-learn's handwritten digits (the embedded data of ``hf_kan.data``, 360 test images,
  8x8 grey upsampled by the model's image processor) asked as "what digit is this ?", answered with one word, scored
  by ``answer_accuracy``. A classification-by-generation smoke task: it runs offline on any supported model; a model
  that was never taught digits scores near chance (0.1).
- ``hf_kan_shapes_vqa``: the test split of the procedural Shapes VQA data set (``hf_kan.data.shapes_vqa``, seed 0,
  48 px scenes, 5,000 rows, the five question types in turn), one-word answers scored by ``answer_accuracy`` and
  grouped by ``question_type``. The task of the shipped vision-language model (``hf-kan eval``). One new token is
  generated: every answer is one word of the model's word-level vocabulary, so this is the training scorer's
  criterion (the greedy prediction of the first answer token).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import HFKanConfigError


@dataclass(frozen=True)
class TaskSpec:
    """An evaluation task (see the module docstring).

    Args:
        name: the task name (also the lmms-eval task name).
        build: ``build(split) -> datasets.Dataset`` with columns ``id``, ``image``, ``question``, ``answer``.
        split: the split evaluated.
        metric: the shipped metric module scoring answers (``hf_kan.eval.metrics``).
        max_new_tokens: answer length.
        until: stop strings; the answer is cut at the first one.
        group_by: a column whose values split the accuracy into groups (e.g. a question type), or None.
        description: one line for listings.
    """

    name: str
    build: Callable[[str], Any]
    split: str = "test"
    metric: str = "answer_accuracy"
    max_new_tokens: int = 8
    until: tuple[str, ...] = ("\n",)
    group_by: str | None = None
    description: str = ""
    generation_kwargs: dict = field(default_factory=dict)
    """extra ``generate`` arguments (greedy decoding by default)"""
    build_takes_limit: bool = False
    """``build(split, limit)`` makes only the first ``limit`` rows (for generated data sets)"""


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, exist_ok: bool = False) -> TaskSpec:
    """Add ``spec`` to the registry (for lmms-eval it also needs a ``<name>.yaml`` in :func:`include_path`)."""
    if spec.name in _TASKS and not exist_ok:
        raise HFKanConfigError(f"task {spec.name!r} is already registered")
    _TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``."""
    if name not in _TASKS:
        raise HFKanConfigError(f"unknown task {name!r}; hf-kan ships {sorted(_TASKS)}")
    return _TASKS[name]


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def include_path() -> str:
    """The folder of task YAML files to pass to lmms-eval's ``--include_path`` (printed by ``hf-kan lmms-tasks``)."""
    return os.path.dirname(os.path.abspath(__file__))


def task_samples(name: str, split: str | None = None, limit: int | None = None) -> list:
    """The samples of task ``name`` (its default split unless ``split``), first ``limit`` only, as ``EvalSample``s
    (``meta`` holds the remaining columns)."""
    from ..runner import EvalSample

    spec = get_task(name)
    data = spec.build(split or spec.split, limit) if spec.build_takes_limit else spec.build(split or spec.split)
    if limit is not None:
        data = data.select(range(min(int(limit), len(data))))
    core = {"id", "image", "question", "answer"}
    return [
        EvalSample(question=row["question"], images=[row["image"].convert("RGB")], answer=row["answer"], id=row["id"],
                   meta={k: v for k, v in row.items() if k not in core})
        for row in data
    ]


DIGITS_QUESTION = "what digit is this ?"


def digits_dataset(split: str = "test"):
    """The embedded digits (``hf_kan.data.load_digits_dataset(as_images=True)``) as question/answer rows: ``id`` (row
    index), ``image`` (8x8 RGB), ``question`` (:data:`DIGITS_QUESTION`), ``answer`` (``"0"`` .. ``"9"``)."""
    import datasets

    from ...data import load_digits_dataset

    data = load_digits_dataset(as_images=True)
    if split not in data:
        raise HFKanConfigError(f"the digits have splits {sorted(data)}, not {split!r}")
    rows = data[split]
    return datasets.Dataset.from_dict(
        {"id": list(range(len(rows))), "image": [im.convert("RGB") for im in rows["image"]],
         "question": [DIGITS_QUESTION] * len(rows), "answer": [str(label) for label in rows["label"]]},
        features=datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image(),
                                    "question": datasets.Value("string"), "answer": datasets.Value("string")}),
    )


def shapes_vqa_dataset(split: str = "test", limit: int | None = None):
    """Shapes VQA's ``split`` (default sizes and seed of ``hf_kan.data.load_shapes_vqa``), first ``limit`` rows, as
    ``id``, ``image``, ``question``, ``answer``, ``question_type``. Each split is a seeded stream, so the first ``n``
    rows are the same whatever ``limit`` is (and the same as in a trainer's split of that size)."""
    import datasets

    from ...data.shapes_vqa import SPLIT_SIZES, generate_shapes_vqa, split_seed

    if split not in SPLIT_SIZES:
        raise HFKanConfigError(f"Shapes VQA has splits {sorted(SPLIT_SIZES)}, not {split!r}")
    size = SPLIT_SIZES[split] if limit is None else min(int(limit), SPLIT_SIZES[split])
    rows = list(generate_shapes_vqa(size, seed=split_seed(0, split)))
    return datasets.Dataset.from_dict(
        {"id": list(range(len(rows))), "image": [r["image"] for r in rows], "question": [r["question"] for r in rows],
         "answer": [r["answer"] for r in rows], "question_type": [r["question_type"] for r in rows]},
        features=datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image(),
                                    "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                    "question_type": datasets.Value("string")}),
    )


def _print_include_path(args) -> int:
    if args.list:
        for name in available_tasks():
            print(f"{name}\t{get_task(name).description}")
    else:
        print(include_path())
    return 0


def add_subparser(subparsers) -> None:
    """``hf-kan lmms-tasks``: print the lmms-eval ``--include_path`` of the shipped tasks (``--list``: their names)."""
    parser = subparsers.add_parser(
        "lmms-tasks", help="print the folder of hf-kan's lmms-eval tasks (for --include_path)",
        description="Print the folder holding hf-kan's lmms-eval task YAMLs, to pass as lmms-eval's --include_path: "
                    "lmms-eval --model hf_kan --model_args pretrained=DIR --tasks hf_kan_digits "
                    "--include_path \"$(hf-kan lmms-tasks)\"")
    parser.add_argument("--list", action="store_true", help="list the shipped task names instead")
    parser.set_defaults(func=_print_include_path)


register_task(TaskSpec(name="hf_kan_digits", build=digits_dataset, max_new_tokens=1,
                       description="embedded digits as one-word visual question answering (smoke task)"))
register_task(TaskSpec(name="hf_kan_shapes_vqa", build=shapes_vqa_dataset, max_new_tokens=1, until=(),
                       group_by="question_type", build_takes_limit=True,
                       description="Shapes VQA test split (procedural scenes, five question types; hf-kan eval)"))

__all__ = ["DIGITS_QUESTION", "TaskSpec", "available_tasks", "digits_dataset", "get_task", "include_path",
           "register_task", "shapes_vqa_dataset", "task_samples"]
