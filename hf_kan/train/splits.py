"""Train / validation / test splits for every trainer: select on validation, test once at the end.

The rule every hf-kan trainer follows: model selection, early stopping and anything else that reacts to a
measurement see the **validation** split only; the **test** split is evaluated once, on the selected model, after
training. A data set without a validation split gets one carved from its training split, deterministically
(:func:`carve_validation`, seeded by a split seed that is independent of the training seed, so runs with different
training seeds share their splits).

:func:`resolve_splits` applies the rule to a mapping of named splits (a ``datasets.DatasetDict`` or a plain dict of
sequences / torch data sets); :func:`split_indices` is the index-level primitive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import HFKanConfigError

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "dev")
TEST_SPLIT_NAMES = ("test",)
DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_SPLIT_SEED = 0


def split_indices(
    n: int,
    held_out: float | int,
    seed: int = DEFAULT_SPLIT_SEED,
    stratify: Sequence[Any] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Partition ``range(n)`` into ``(kept, held)``, both sorted.

    ``held_out``: a fraction in (0, 1) (``ceil(held_out * n)`` rows are held out) or a row count. Stratified by the
    labels in ``stratify`` when given. Depends only on the arguments (scikit-learn's ``train_test_split``)."""
    if isinstance(held_out, float):
        if not 0.0 < held_out < 1.0:
            raise HFKanConfigError(f"the held-out fraction must be in (0, 1), got {held_out}")
        count = math.ceil(held_out * n)
    else:
        count = int(held_out)
    if not 0 < count < n:
        raise HFKanConfigError(f"cannot hold out {count} of {n} rows and keep the others; change the fraction")
    from sklearn.model_selection import train_test_split

    labels = None if stratify is None else np.asarray(stratify)
    kept, held = train_test_split(np.arange(n), test_size=count, random_state=seed, stratify=labels)
    return np.sort(kept), np.sort(held)


def _take(rows: Any, indices: np.ndarray) -> Any:
    """The rows of ``rows`` at ``indices``, as the same kind of object where possible."""
    if hasattr(rows, "select") and hasattr(rows, "column_names"):  # datasets.Dataset
        return rows.select(indices.tolist())
    if isinstance(rows, np.ndarray):
        return rows[indices]
    try:
        import torch

        if isinstance(rows, torch.Tensor):
            return rows[torch.from_numpy(indices)]
        if isinstance(rows, torch.utils.data.Dataset) and not isinstance(rows, Sequence):
            return torch.utils.data.Subset(rows, indices.tolist())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return [rows[i] for i in indices.tolist()]


def carve_validation(
    train: Any,
    fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    stratify: Sequence[Any] | np.ndarray | str | None = None,
) -> tuple[Any, Any]:
    """Hold out ``fraction`` of ``train`` as a validation split; returns ``(train, validation)``.

    ``train``: a ``datasets.Dataset``, a tensor / array (rows on dim 0), a torch ``Dataset`` or any sequence.
    ``stratify``: labels per row, or (for a ``datasets.Dataset``) the name of its label column. Deterministic in
    ``seed`` (:func:`split_indices`)."""
    if isinstance(stratify, str):
        stratify = train[stratify]
    kept, held_out = split_indices(len(train), fraction, seed, stratify=stratify)
    return _take(train, kept), _take(train, held_out)


@dataclass
class Splits:
    """The splits a trainer uses, and where each came from (for logs, metrics.json and model cards)."""

    train: Any
    validation: Any
    test: Any | None
    validation_source: str
    test_source: str | None

    def describe(self) -> str:
        """One line: sizes and sources of the three splits."""
        test = f"{len(self.test)} test ({self.test_source})" if self.test is not None else "no test split"
        return f"{len(self.train)} train, {len(self.validation)} validation ({self.validation_source}), {test}"


def resolve_splits(
    raw: Mapping[str, Any],
    *,
    train_split: str = "train",
    validation_split: str | None = None,
    test_split: str | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    stratify: str | None = None,
) -> Splits:
    """Pick train / validation / test from the named splits in ``raw``.

    Validation: ``validation_split`` if given, else the first of :data:`VALIDATION_SPLIT_NAMES` present, else
    ``validation_fraction`` of the training split carved off with ``seed`` (stratified by the column ``stratify``
    when given). Test: ``test_split`` if given, else ``"test"`` when present, else none. A test split is never used
    for validation.
    """
    names = list(raw)
    for role, name in (("train", train_split), ("validation", validation_split), ("test", test_split)):
        if name is not None and name not in raw:
            raise HFKanConfigError(f"{role} split {name!r} not found; the data set has splits {names}")
    if validation_split is not None and validation_split in (train_split, test_split):
        raise HFKanConfigError(
            f"the validation split {validation_split!r} must differ from the train and test splits: selecting a "
            "model on the split it is reported on overstates its accuracy"
        )
    if test_split is None:
        test_split = next((n for n in TEST_SPLIT_NAMES if n in raw and n not in (train_split, validation_split)), None)
    if validation_split is None:
        validation_split = next(
            (n for n in VALIDATION_SPLIT_NAMES if n in raw and n not in (train_split, test_split)), None
        )
    train = raw[train_split]
    if validation_split is not None:
        validation, validation_source = raw[validation_split], f"split {validation_split!r}"
    else:
        train, validation = carve_validation(train, validation_fraction, seed, stratify=stratify)
        validation_source = f"{validation_fraction:.0%} of {train_split!r} held out, seed {seed}"
    test = raw[test_split] if test_split is not None else None
    test_source = f"split {test_split!r}" if test_split is not None else None
    return Splits(train, validation, test, validation_source, test_source)


__all__ = [
    "DEFAULT_SPLIT_SEED",
    "DEFAULT_VALIDATION_FRACTION",
    "TEST_SPLIT_NAMES",
    "VALIDATION_SPLIT_NAMES",
    "Splits",
    "carve_validation",
    "resolve_splits",
    "split_indices",
]
