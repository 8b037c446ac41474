"""The Shapes VQA model shipped inside the package (``hf_kan/assets/shapes_vqa_kat``): path and loader.

It is a KAT-tower LLaVA trained by ``hf-kan vlm-train`` and packaged by ``hf-kan vlm-package`` (README, "Multimodal
main job"); the folder holds ``model.safetensors`` (with the DyVTE routers), ``config.json`` (with the calibrated
patches: the debiasing trend, VAR's sink dimensions, DyVTE), the processor files, the model card (``README.md``),
the training ``metrics.json``, ``calibration.json`` (what the calibrations found) and ``reference_scores.json``
(the accuracy the README states, on a fixed subset of the test split, with its tolerance).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ShippedModelMissingError

SHIPPED_MODEL = "shapes_vqa_kat"
REFERENCE_FILE = "reference_scores.json"


def assets_dir(name: str = SHIPPED_MODEL) -> Path:
    """The folder of shipped model ``name`` inside the installed package (whether or not it holds a model)."""
    return Path(str(resources.files("hf_kan") / "assets" / name))


def pretrained_path(name: str = SHIPPED_MODEL) -> Path:
    """Directory of the shipped model ``name`` (loadable with ``from_pretrained``); raises
    :class:`~hf_kan.errors.ShippedModelMissingError` when the package holds no model there."""
    path = assets_dir(name)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ShippedModelMissingError(
            f"no shipped model {name!r} in {path}: this installation was built without it (a checkout before the "
            f"model was packaged, or a wheel without its package data). Produce it with `hf-kan vlm-train "
            f"--output-dir DIR && hf-kan vlm-package DIR`, or pass a model directory explicitly"
        )
    return path


def load_pretrained(name: str = SHIPPED_MODEL, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, processor)`` of the shipped model in eval mode, text attention on ``"hf_kan"`` with the saved patches
    attached (``hf_kan.patches.from_pretrained``; switch them with ``hf_kan.patches.apply(model, prune=False, ...)``);
    ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .. import models, patches  # noqa: F401  (models registers the KAT vision tower)

    path = pretrained_path(name)
    model = patches.from_pretrained(LlavaForConditionalGeneration, path, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(path)


__all__ = ["REFERENCE_FILE", "SHIPPED_MODEL", "assets_dir", "load_pretrained", "pretrained_path"]
