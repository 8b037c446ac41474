"""A small vision-language model trained from scratch: LLaVA with a KAT (or same-size ViT) vision tower on the
procedural Shapes VQA data set (:mod:`hf_kan.data.shapes_vqa`), its tokenizer and processor, the trainer
(``hf-kan vlm-train``) and the model shipped inside the package."""

from __future__ import annotations

from .modeling import TOWERS, VLMShape, build_vlm, vlm_config
from .pretrained import SHIPPED_MODEL, load_pretrained, pretrained_path
from .processing import build_processor, build_tokenizer, prompt_text
from .scoring import score_batch, summarize

__all__ = [
    "SHIPPED_MODEL",
    "TOWERS",
    "VLMShape",
    "build_processor",
    "build_tokenizer",
    "build_vlm",
    "load_pretrained",
    "pretrained_path",
    "prompt_text",
    "score_batch",
    "summarize",
    "vlm_config",
]
