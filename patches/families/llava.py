"""LLaVA-1.5 (``llava``): one contiguous run of ``image_token_id`` per image, an ``s x s`` raster grid
(``s = image_size // patch_size``), preceded by one CLS token when ``vision_feature_select_strategy == "full"``."""

from __future__ import annotations

import torch

from ..engine.layout import IMAGE, VisualItem, raster
from .base import FamilyAdapter, encoder_image_features, mismatch, split_runs


def _num_images(inputs: dict) -> int | None:
    pv = inputs.get("pixel_values")
    if pv is not None:
        return int(pv.shape[0])
    feats = encoder_image_features(inputs)
    return None if feats is None else len(feats)


def visual_items(model, input_ids: torch.Tensor, inputs: dict) -> list[VisualItem]:
    cfg = model.config
    s = cfg.vision_config.image_size // cfg.vision_config.patch_size
    cls = 1 if cfg.vision_feature_select_strategy == "full" else 0
    n = s * s + cls
    rows, cols = raster(s, s)
    grid = torch.zeros(n, dtype=torch.long)
    if cls:
        rows = torch.cat([torch.tensor([-1]), rows])
        cols = torch.cat([torch.tensor([-1]), cols])
        grid[0] = -1
    newline = torch.zeros(n, dtype=torch.bool)
    items = []
    total = 0
    for b, sample_runs in enumerate(split_runs(input_ids, cfg.image_token_id)):
        for start, stop in sample_runs:
            if (stop - start) % n:
                raise mismatch(
                    "image tokens in one run", stop - start, n * max(1, round((stop - start) / n)),
                    f"each LLaVA image takes exactly {n} consecutive image tokens; build the prompt with the "
                    "model's processor",
                )
            for first in range(start, stop, n):
                items.append(VisualItem(b, first, IMAGE, grid, rows, cols, newline))
            total += stop - start
    expected = _num_images(inputs)
    if expected is not None and total != expected * n:
        raise mismatch("image tokens", total, expected * n,
                       f"{expected} image(s) x {n} tokens each; check the number of <image> placeholders")
    return items


ADAPTER = FamilyAdapter(model_type="llava", visual_items=visual_items)
