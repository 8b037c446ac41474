"""The Shapes VQA model shipped inside the package (``hf_kan/assets/shapes_vqa_kat``): path and loader.

It is the KAT-tower LLaVA trained by the default ``hf-kan vlm-train`` recipe (README, "A small vision-language
model"); the folder holds ``model.safetensors``, ``config.json``, the processor files, the model card
(``README.md``) and the training ``metrics.json``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import HFKanConfigError

SHIPPED_MODEL = "shapes_vqa_kat"


def pretrained_path(name: str = SHIPPED_MODEL) -> Path:
    """Directory of the shipped model ``name`` inside the installed package (loadable with ``from_pretrained``)."""
    path = Path(str(resources.files("hf_kan") / "assets" / name))
    if not (path / "config.json").is_file():
        raise HFKanConfigError(
            f"no shipped model {name!r} in {path.parent}; the package data is missing (reinstall hf-kan) or the "
            f"name is wrong (shipped: {SHIPPED_MODEL!r})"
        )
    return path


def load_pretrained(name: str = SHIPPED_MODEL, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, processor)`` of the shipped model, in eval mode; ``kwargs`` go to ``from_pretrained`` (e.g.
    ``attn_implementation={"text_config": "hf_kan", "vision_config": "sdpa"}`` before applying patches)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .. import models  # noqa: F401  (registers the KAT vision tower)

    path = pretrained_path(name)
    model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(path)


__all__ = ["SHIPPED_MODEL", "load_pretrained", "pretrained_path"]
