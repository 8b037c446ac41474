"""LLaVA-1.5 (``llava``): one contiguous run of ``image_token_id`` per image, an ``s x s`` raster grid
(``s = image_size // patch_size``), preceded by one CLS token when ``vision_feature_select_strategy == "full"``.

Every image has the same ``n`` tokens, so an image cut by a forward boundary (chunked prefill) is continued exactly
from the number of visual tokens that ended the previous forward (``lead``)."""

from __future__ import annotations

import torch

from ..engine.layout import IMAGE, VisualItem, raster
from .base import FamilyAdapter, encoder_image_features, feature_rows, mismatch, split_runs


def _item_tokens(cfg) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s = cfg.vision_config.image_size // cfg.vision_config.patch_size
    cls = 1 if cfg.vision_feature_select_strategy == "full" else 0
    n = s * s + cls
    rows, cols = raster(s, s)
    grid = torch.zeros(n, dtype=torch.long)
    if cls:
        rows = torch.cat([torch.tensor([-1]), rows])
        cols = torch.cat([torch.tensor([-1]), cols])
        grid[0] = -1
    return n, grid, rows, cols, torch.zeros(n, dtype=torch.bool)


def visual_items(model, input_ids: torch.Tensor, inputs: dict, lead: list[int] | None = None) -> list[VisualItem]:
    lead = lead or [0] * input_ids.shape[0]
    cfg = model.config
    n, grid, rows, cols, newline = _item_tokens(cfg)
    pv = inputs.get("pixel_values")
    feats = encoder_image_features(inputs) if pv is None else None
    # raw pixels always hold whole images; pre-encoded features are sliced per chunk in a chunked prefill
    pieces = pv is None and feats is not None
    t = input_ids.shape[1]
    items, total = [], 0
    for b, sample_runs in enumerate(split_runs(input_ids, cfg.image_token_id)):
        for start, stop in sample_runs:
            head = lead[b] % n if (start == 0 and pieces) else 0  # tokens of this image seen by earlier forwards
            if (head + stop - start) % n and not (pieces and stop == t):
                length = head + stop - start
                raise mismatch(
                    "image tokens in one run", length, n * max(1, round(length / n)),
                    f"each LLaVA image takes exactly {n} consecutive image tokens; build the prompt with the "
                    "model's processor",
                )
            for first in range(start - head, stop, n):
                items.append(VisualItem(b, first, IMAGE, grid, rows, cols, newline))
            total += stop - start
    expected = int(pv.shape[0]) * n if pv is not None else (feature_rows(feats) if feats is not None else None)
    if expected is not None and total != expected:
        raise mismatch("image tokens", total, expected,
                       f"{n} tokens per image; check the number of <image> placeholders against the images")
    return items


ADAPTER = FamilyAdapter(model_type="llava", visual_items=visual_items)
