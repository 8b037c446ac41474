"""The image processor saved with trained models reloads as the PIL preprocessing the model was trained with, even
where ``AutoImageProcessor`` would pick the torchvision backend (torchvision installed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.auto import image_processing_auto

from hf_kan.models.image_processing import HFKanViTImageProcessor
from hf_kan.train.data import default_image_processor


def pil_reference(image: Image.Image, size: int, mode: str) -> torch.Tensor:
    """What training feeds the model: PIL bilinear resize to size x size, x / 255, (x - 0.5) / 0.5."""
    pixels = np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32)
    x = torch.from_numpy(pixels.reshape(size, size, -1)).permute(2, 0, 1) / 255
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("num_channels", [1, 3])
def test_saved_default_processor_reloads_as_pil_where_torchvision_is_installed(tmp_path, monkeypatch, num_channels):
    trained_with = default_image_processor(12, num_channels)
    trained_with.save_pretrained(tmp_path)
    # what AutoImageProcessor does on a machine with torchvision: backend=None resolves to "torchvision" (the PyPI
    # torchvision build needs the CUDA torch, so it is simulated here as in the KAT converter's test)
    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    assert image_processing_auto._resolve_backend(None, None, "HFKanViTImageProcessor") == "torchvision"
    # the stock processor's name maps to a torchvision class there; hf-kan's maps to PIL only
    assert image_processing_auto._find_mapping_for_image_processor("ViTImageProcessorPil")["torchvision"] == (
        "ViTImageProcessor")
    assert image_processing_auto._find_mapping_for_image_processor("HFKanViTImageProcessor") == {
        "pil": HFKanViTImageProcessor}
    for kwargs in ({}, {"backend": "torchvision"}):
        loaded = AutoImageProcessor.from_pretrained(tmp_path, **kwargs)
        assert type(loaded) is HFKanViTImageProcessor and loaded.backend == "pil"
        assert loaded.to_dict() == trained_with.to_dict()

    rng = np.random.default_rng(0)
    mode = "RGB" if num_channels == 3 else "L"
    for height, width in [(8, 8), (30, 17), (17, 45)]:  # up- and down-sampling, non-square
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
        out = loaded(image, return_tensors="pt").pixel_values[0]
        assert torch.equal(out, trained_with(image, return_tensors="pt").pixel_values[0])
        torch.testing.assert_close(out, pil_reference(image, 12, mode), rtol=0, atol=1e-6)
