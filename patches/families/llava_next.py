"""LLaVA-NeXT (``llava_next``): per image, a base ``s x s`` grid, then the unpadded high-resolution ``r x c`` grid
with one image-newline token after each row (all ``image_token_id``): ``s^2 + r (c + 1)`` tokens.

``r`` and ``c`` come from ``image_sizes`` (as ``pack_image_features`` computes them) in a plain forward; inside
``generate`` ``image_sizes`` never reaches ``forward``, so they are read from the pre-computed features instead:
newline rows equal ``model.model.image_newline`` exactly.
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from ..engine.layout import IMAGE, VisualItem, raster
from .base import FamilyAdapter, encoder_image_features, mismatch, split_runs


def _grid_from_size(cfg, size) -> tuple[int, int]:
    s = cfg.vision_config.image_size // cfg.vision_config.patch_size
    nph, npw = get_anyres_image_grid_shape(
        tuple(int(x) for x in size), cfg.image_grid_pinpoints, cfg.vision_config.image_size
    )
    r, c = unpad_image(torch.empty(0, nph * s, npw * s), tuple(int(x) for x in size)).shape[-2:]
    return int(r), int(c)


def _grid_from_features(feat: torch.Tensor, newline: torch.Tensor, s2: int) -> tuple[int, int]:
    """(r, c) of one packed image: newline rows equal ``image_newline``; the first one closes high-res row 0."""
    is_nl = (feat == newline.to(feat.dtype)).all(-1).nonzero().flatten()
    if is_nl.numel() == 0:
        return 0, 0
    return int(is_nl.numel()), int(is_nl[0]) - s2


def _image_grids(model, inputs: dict) -> list[tuple[int, int]] | None:
    cfg = model.config
    sizes = inputs.get("image_sizes")
    if sizes is not None:
        return [_grid_from_size(cfg, size) for size in sizes.tolist()]
    feats = encoder_image_features(inputs)
    if feats is None:
        return None
    s2 = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    return [_grid_from_features(f, model.model.image_newline, s2) for f in feats]


def _item_tokens(s: int, r: int, c: int):
    br, bc = raster(s, s)
    rows, cols, grid, nl = [br], [bc], [torch.zeros(s * s, dtype=torch.long)], [torch.zeros(s * s, dtype=torch.bool)]
    if r:
        hr, hc = raster(r, c + 1)  # column c of each row is its newline token
        is_nl = hc == c
        rows.append(hr)
        cols.append(torch.where(is_nl, -1, hc))
        grid.append(torch.ones(r * (c + 1), dtype=torch.long))
        nl.append(is_nl)
    return torch.cat(grid), torch.cat(rows), torch.cat(cols), torch.cat(nl)


def visual_items(model, input_ids: torch.Tensor, inputs: dict) -> list[VisualItem]:
    cfg = model.config
    s = cfg.vision_config.image_size // cfg.vision_config.patch_size
    grids = _image_grids(model, inputs)
    sample_runs = split_runs(input_ids, cfg.image_token_id)
    found = sum(stop - start for rs in sample_runs for start, stop in rs)
    if grids is None:
        if found:
            raise mismatch("image tokens", found, 0, "LLaVA-NeXT needs pixel_values and image_sizes with image tokens")
        return []
    counts = [s * s + r * (c + 1) for r, c in grids]
    if found != sum(counts):
        raise mismatch("image tokens", found, sum(counts),
                       f"per image {counts}; build the prompt with LlavaNextProcessor for these image sizes")
    items, k = [], 0
    for b, rs in enumerate(sample_runs):
        for start, stop in rs:
            pos = start
            while pos < stop:
                if k >= len(counts) or pos + counts[k] > stop:
                    raise mismatch("image tokens in a run", stop - start, counts[k] if k < len(counts) else 0,
                                   "image-token runs do not line up with the images' sizes")
                grid, rows, cols, nl = _item_tokens(s, *grids[k])
                items.append(VisualItem(b, pos, IMAGE, grid, rows, cols, nl))
                pos += counts[k]
                k += 1
    return items


ADAPTER = FamilyAdapter(model_type="llava_next", visual_items=visual_items)
