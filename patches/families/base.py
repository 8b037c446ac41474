"""What a model family adapter declares, and the shared helpers adapters use.

An adapter is a small declarative ``FamilyAdapter``: the ``model_type`` it serves, where the language model sits,
and one function ``visual_items(model, input_ids, inputs, lead)`` that finds the visual tokens of the current forward
and returns them as ``VisualItem`` runs (with grid coordinates), raising ``InputLayoutError`` when the image-token
count does not match the images. ``lead[b]`` is the number of visual tokens that end sample ``b``'s earlier forwards:
in a chunked prefill (``generate(..., prefill_chunk_size=N)``) a forward boundary may cut an image, whose pieces then
arrive in consecutive forwards, with pre-encoded features sliced to the placeholder tokens of each forward.
Everything generic (text/padding, original positions, MMA spans, masks, cache ledger) is done once, in
``engine.layout.build_layout`` and the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InputLayoutError
from ..engine.layout import VisualItem, runs


@dataclass(frozen=True)
class FamilyAdapter:
    """Declarative description of one model family."""

    model_type: str
    #: ``visual_items(model, input_ids, inputs, lead) -> list[VisualItem]``; ``inputs`` are the forward's keyword
    #: arguments (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ``mm_encoder_outputs``, ``position_ids``
    #: ...), ``lead`` the per-sample count of visual tokens right before this forward (see the module docstring)
    visual_items: Callable[[nn.Module, torch.Tensor, dict, list[int]], list[VisualItem]]
    #: attribute path from the top-level model to the text decoder stack (the module with ``.layers``)
    language_model_path: str = "model.language_model"

    def language_model(self, model: nn.Module) -> nn.Module:
        """The text decoder stack of a ``...ForConditionalGeneration`` (or of the bare ``...Model``)."""
        module = model
        for part in self.language_model_path.split("."):
            if not hasattr(module, part):
                return model.language_model  # the bare multimodal model: one level up
            module = getattr(module, part)
        return module

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers


def split_runs(input_ids: torch.Tensor, token_id: int) -> list[list[tuple[int, int]]]:
    """Per sample, the runs ``(start, stop)`` of ``token_id``."""
    return [runs(row == token_id) for row in input_ids.cpu()]


def mismatch(what: str, found: int, expected: int, hint: str) -> InputLayoutError:
    return InputLayoutError(
        f"the prompt has {found} {what} but the images need {expected}; {hint}"
    )


def feature_rows(features) -> int:
    """Number of placeholder rows in pre-encoded image features: a ``(N, n, D)`` or ``(rows, D)`` tensor, or a list of
    per-image ``(n_i, D)`` tensors (``generate`` slices them to one ``(1, rows, D)`` / ``[(rows, D)]`` per chunk of a
    chunked prefill)."""
    if isinstance(features, torch.Tensor):
        return int(features.shape[:-1].numel())
    return sum(int(f.shape[:-1].numel()) for f in features)


def unknown_coordinates(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grid, row, col, newline`` of ``length`` visual tokens whose place in their image is unknown."""
    minus = torch.full((length,), -1, dtype=torch.long)
    return minus, minus, minus, torch.zeros(length, dtype=torch.bool)


def encoder_image_features(inputs: dict):
    """The image features ``generate`` pre-computed (``mm_encoder_outputs['image']``), if any."""
    enc = inputs.get("mm_encoder_outputs") or {}
    out = enc.get("image") if isinstance(enc, dict) else None
    if out is None:
        return None
    return getattr(out, "pooler_output", None) if not isinstance(out, (torch.Tensor, list, tuple)) else out


__all__ = ["FamilyAdapter", "encoder_image_features", "feature_rows", "mismatch", "split_runs",
           "unknown_coordinates"]
