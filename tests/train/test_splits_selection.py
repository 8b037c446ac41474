"""Train / validation / test splits and model selection on validation (hf_kan.train.splits, hf_kan.train.selection)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from hf_kan.errors import HFKanConfigError
from hf_kan.train.selection import ModelSelector
from hf_kan.train.splits import carve_validation, resolve_splits, split_indices


def test_split_indices_is_a_deterministic_stratified_partition():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    kept, held = split_indices(100, 0.2, seed=3, stratify=labels)
    assert len(held) == 20 and len(kept) == 80
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(100))
    assert np.bincount(labels[held]).tolist() == [8, 6, 4, 2]  # 20 % of every class
    again_kept, again_held = split_indices(100, 0.2, seed=3, stratify=labels)
    assert np.array_equal(held, again_held) and np.array_equal(kept, again_kept)
    assert not np.array_equal(held, split_indices(100, 0.2, seed=4, stratify=labels)[1])
    assert len(split_indices(100, 7)[1]) == 7  # a count instead of a fraction
    assert len(split_indices(10, 0.25)[1]) == 3  # ceil, as scikit-learn
    for bad in (0.0, 1.0, 0, 100):
        with pytest.raises(HFKanConfigError, match="hold out|fraction"):
            split_indices(100, bad)


@pytest.mark.parametrize("kind", ["dataset", "tensor", "list", "torch_dataset"])
def test_carve_validation_keeps_the_container_type(kind):
    rows = list(range(50))
    container = {
        "dataset": datasets.Dataset.from_dict({"x": rows}),
        "tensor": torch.tensor(rows),
        "list": rows,
        "torch_dataset": torch.utils.data.TensorDataset(torch.tensor(rows)),
    }[kind]
    train, validation = carve_validation(container, 0.2, seed=1)
    assert len(train) == 40 and len(validation) == 10

    def values(part):
        if kind == "dataset":
            return list(part["x"])
        if kind == "torch_dataset":
            return [int(part[i][0]) for i in range(len(part))]
        return [int(v) for v in part]

    assert sorted(values(train) + values(validation)) == rows
    _, expected = split_indices(50, 0.2, seed=1)
    assert values(validation) == expected.tolist()


def test_carve_validation_stratifies_by_a_dataset_column():
    data = datasets.Dataset.from_dict({"label": [0] * 90 + [1] * 10})
    _, validation = carve_validation(data, 0.1, seed=0, stratify="label")
    assert sorted(validation["label"]) == [0] * 9 + [1]


def test_resolve_splits_never_selects_on_test():
    raw = {"train": list(range(100)), "test": list(range(100, 120))}
    splits = resolve_splits(raw, validation_fraction=0.1, seed=0)
    assert len(splits.train) == 90 and len(splits.validation) == 10 and splits.test == raw["test"]
    assert set(splits.validation) <= set(range(100))  # carved from train, not taken from test
    assert splits.validation_source == "10% of 'train' held out, seed 0" and splits.test_source == "split 'test'"

    raw["valid"] = list(range(200, 210))
    splits = resolve_splits(raw)
    assert splits.validation == raw["valid"] and splits.train == raw["train"]
    assert "10 validation (split 'valid')" in splits.describe()

    only_train = resolve_splits({"train": list(range(30))}, validation_fraction=0.2)
    assert only_train.test is None and len(only_train.validation) == 6 and "no test split" in only_train.describe()


def test_resolve_splits_errors():
    raw = {"train": [1, 2, 3], "test": [4]}
    with pytest.raises(HFKanConfigError, match="validation split 'dev' not found"):
        resolve_splits(raw, validation_split="dev")
    with pytest.raises(HFKanConfigError, match="overstates"):
        resolve_splits(raw, validation_split="test", test_split="test")
    with pytest.raises(HFKanConfigError, match="train split 'training' not found"):
        resolve_splits(raw, train_split="training")


def _model(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_selector_keeps_the_best_parameters_and_restores_them():
    model = _model(0.0)
    selector = ModelSelector("validation_accuracy", "max", patience=2)
    for step, (weight, accuracy) in enumerate([(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (4.0, 0.7)], start=1):
        with torch.no_grad():
            model.weight.fill_(weight)
        improved = selector.update(model, {"validation_accuracy": accuracy, "validation_loss": 1.0}, step)
        assert improved == (step in (1, 2))
    assert (selector.best_value, selector.best_step) == (0.7, 2)  # a tie does not replace the earlier best
    assert selector.should_stop  # two evaluations without improvement
    selector.restore(model)
    assert torch.all(model.weight == 2.0)
    assert selector.summary() == {"metric": "validation_accuracy", "mode": "max", "best_value": 0.7, "best_step": 2,
                                  "patience": 2}  # fmt: skip


def test_selector_min_mode_and_trainable_only():
    model = torch.nn.Sequential(_model(1.0), _model(5.0))
    model[1].weight.requires_grad_(False)
    selector = ModelSelector("validation_loss", "min", trainable_only=True)
    selector.update(model, {"validation_loss": 2.0}, 1)
    with torch.no_grad():
        model[0].weight.fill_(9.0)
        model[1].weight.fill_(9.0)
    assert not selector.update(model, {"validation_loss": 2.5}, 2) and not selector.should_stop
    selector.restore(model)
    assert torch.all(model[0].weight == 1.0) and torch.all(model[1].weight == 9.0)  # frozen weights untouched


def test_selector_errors():
    with pytest.raises(HFKanConfigError, match="mode"):
        ModelSelector("x", "largest")
    with pytest.raises(HFKanConfigError, match="patience"):
        ModelSelector("x", patience=0)
    selector = ModelSelector("validation_accuracy")
    with pytest.raises(HFKanConfigError, match="evaluate at least once"):
        selector.restore(_model(0.0))
    with pytest.raises(HFKanConfigError, match="lack the selection metric"):
        selector.update(_model(0.0), {"accuracy": 1.0}, 1)
