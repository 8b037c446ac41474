"""The embedded digits data set: shapes, labels, split, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from hf_kan.data import DIGITS_LABEL_NAMES, digits_to_pixel_values, load_digits_dataset
from hf_kan.errors import HFKanConfigError


@pytest.fixture(scope="module")
def raw_digits():
    raw = load_digits()
    return raw.images.astype(np.float32), raw.target


@pytest.fixture(scope="module")
def native():
    """The digits at their native 8x8 size, one channel: pixel_values * 0.5 + 0.5 recovers x / 16 exactly."""
    return load_digits_dataset(image_size=8, num_channels=1)


def test_splits_shapes_and_labels():
    data = load_digits_dataset(image_size=16, num_channels=3)
    assert list(data) == ["train", "validation", "test"]
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (1257, 180, 360)
    assert data["train"].features["label"].names == DIGITS_LABEL_NAMES
    batch = data["test"].with_format("torch")[:]
    assert batch["pixel_values"].shape == (360, 3, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    # channels are copies of the grey channel
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])
    # stratified: every class holds 1/5 of its images (+-1) in the test split and 1/10 in the validation split
    all_counts = np.bincount(load_digits().target, minlength=10)
    for split, share in (("test", 0.2), ("validation", 0.1)):
        counts = np.bincount(np.asarray(data[split]["label"]), minlength=10)
        assert np.all(np.abs(counts - all_counts * share) <= 1), split


def test_split_is_a_partition_of_sklearn_digits(native, raw_digits):
    images, targets = raw_digits
    rows = []
    for split in ("train", "validation", "test"):
        batch = native[split].with_format("torch")[:]
        recovered = (batch["pixel_values"][:, 0] * 0.5 + 0.5) * 16  # undo normalisation -> 0..16
        assert torch.allclose(recovered, recovered.round(), atol=1e-5)
        rows += [(img.round().to(torch.int64).numpy().tobytes(), int(y)) for img, y in zip(recovered, batch["label"])]
    expected = [(img.astype(np.int64).tobytes(), int(y)) for img, y in zip(images, targets)]
    assert sorted(rows) == sorted(expected)  # every digit exactly once, with its own label


@pytest.mark.parametrize("split", ["validation", "test"])
def test_split_depends_only_on_seed(split):
    a = load_digits_dataset(image_size=8, num_channels=1, seed=0)[split].with_format("numpy")[:]["pixel_values"]
    b = load_digits_dataset(image_size=8, num_channels=1, seed=0)[split].with_format("numpy")[:]["pixel_values"]
    c = load_digits_dataset(image_size=8, num_channels=1, seed=1)[split].with_format("numpy")[:]["pixel_values"]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_test_split_is_the_one_reported_before_the_validation_split_existed():
    """The 360 test images are scikit-learn's stratified 20 % split with seed 0, as before: old and new test
    figures are measured on the same images."""
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    _, test_idx = train_test_split(np.arange(len(raw.target)), test_size=0.2, random_state=0, stratify=raw.target)
    test = load_digits_dataset(image_size=8, num_channels=1)["test"].with_format("numpy")[:]
    np.testing.assert_allclose((test["pixel_values"][:, 0] * 0.5 + 0.5) * 16, raw.images[np.sort(test_idx)], atol=1e-5)


def test_upsampling_is_bilinear_and_normalised():
    images = np.random.default_rng(0).integers(0, 17, size=(5, 8, 8)).astype(np.float32)
    out = digits_to_pixel_values(images, image_size=32, num_channels=3)
    assert out.shape == (5, 3, 32, 32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(images / 16).unsqueeze(1), size=32, mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(out[:, 1:2], (expected - 0.5) / 0.5)
    # constant images stay constant: all-0 -> -1, all-16 -> +1
    const = digits_to_pixel_values(np.stack([np.zeros((8, 8)), np.full((8, 8), 16.0)]), image_size=12, num_channels=1)
    assert torch.allclose(const[0], torch.tensor(-1.0)) and torch.allclose(const[1], torch.tensor(1.0))


def test_as_images(raw_digits):
    data = load_digits_dataset(as_images=True)
    row = data["train"][0]
    assert row["image"].mode == "L" and row["image"].size == (8, 8)
    values = np.asarray(row["image"])
    # pixel = round(x * 255 / 16): a multiple of 255/16 up to rounding
    assert np.all(np.abs(values / (255 / 16) - np.rint(values / (255 / 16))) < 0.04)


def test_bad_arguments():
    with pytest.raises(HFKanConfigError, match="test_fraction"):
        load_digits_dataset(test_fraction=1.5)
    with pytest.raises(HFKanConfigError, match="validation_fraction"):
        load_digits_dataset(test_fraction=0.5, validation_fraction=0.6)
    with pytest.raises(HFKanConfigError, match="image_size"):
        digits_to_pixel_values(np.zeros((1, 8, 8)), image_size=0)
    with pytest.raises(HFKanConfigError, match="shape"):
        digits_to_pixel_values(np.zeros((8, 8)))
