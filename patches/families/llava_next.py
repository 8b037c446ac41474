"""LLaVA-NeXT (``llava_next``): per image, a base ``s x s`` grid, then the unpadded high-resolution ``r x c`` grid
with one image-newline token after each row (all ``image_token_id``): ``s^2 + r (c + 1)`` tokens.

``r`` and ``c`` come from ``image_sizes`` (as ``pack_image_features`` computes them) in a plain forward; inside
``generate`` ``image_sizes`` never reaches ``forward``, so they are read from the pre-encoded features instead:
newline rows equal ``model.model.image_newline`` exactly. In a chunked prefill the features arrive sliced to the
placeholders of each forward; images that a forward holds whole keep their grid, and the tokens of a run that cannot
be split into whole images (an image cut by the forward boundary) are image tokens with unknown coordinates
(newline flags still exact).
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from ...errors import InputLayoutError
from ..engine.layout import IMAGE, VisualItem, raster
from .base import FamilyAdapter, encoder_image_features, feature_rows, mismatch, split_runs, unknown_coordinates


def _grid_from_size(cfg, size, index: int) -> tuple[int, int]:
    size = tuple(int(x) for x in size)
    if len(size) != 2 or min(size) <= 0:
        raise InputLayoutError(
            f"image_sizes[{index}] = {list(size)} is not an image size: LLaVA-NeXT needs (height, width) with both "
            "sides > 0, as the processor reports them"
        )
    s = cfg.vision_config.image_size // cfg.vision_config.patch_size
    nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    r, c = unpad_image(torch.empty(0, nph * s, npw * s), size).shape[-2:]
    return int(r), int(c)


def _newline_flags(feat: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` bool: which feature rows are the image-newline embedding."""
    return (feat.reshape(-1, feat.shape[-1]) == newline.to(feat.dtype)).all(-1).cpu()


def _grid_from_features(is_nl: torch.Tensor, s2: int) -> tuple[int, int]:
    """(r, c) of one packed image from its newline flags; the first newline closes high-res row 0."""
    where = is_nl.nonzero().flatten()
    if where.numel() == 0:
        return 0, 0
    return int(where.numel()), int(where[0]) - s2


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


def _whole_images(sample_runs, counts, grids, s: int) -> list[VisualItem] | None:
    """Items for runs that are whole images in order (``counts`` tokens each), or ``None`` if they are not."""
    items, k = [], 0
    for b, rs in enumerate(sample_runs):
        for start, stop in rs:
            pos = start
            while pos < stop:
                if k >= len(counts) or pos + counts[k] > stop:
                    return None
                grid, rows, cols, nl = _item_tokens(s, *grids[k])
                items.append(VisualItem(b, pos, IMAGE, grid, rows, cols, nl))
                pos += counts[k]
                k += 1
    return items if k == len(counts) else None


def _pieces(sample_runs, is_nl: torch.Tensor) -> list[VisualItem]:
    """One item per run with unknown coordinates and the newline flags of its feature rows."""
    items, i = [], 0
    for b, rs in enumerate(sample_runs):
        for start, stop in rs:
            grid, rows, cols, _ = unknown_coordinates(stop - start)
            items.append(VisualItem(b, start, IMAGE, grid, rows, cols, is_nl[i:i + stop - start]))
            i += stop - start
    return items


def visual_items(model, input_ids: torch.Tensor, inputs: dict, lead: list[int] | None = None) -> list[VisualItem]:
    lead = lead or [0] * input_ids.shape[0]
    cfg = model.config
    s = cfg.vision_config.image_size // cfg.vision_config.patch_size
    sample_runs = split_runs(input_ids, cfg.image_token_id)
    found = sum(stop - start for rs in sample_runs for start, stop in rs)
    sizes = inputs.get("image_sizes")
    feats = None if sizes is not None else encoder_image_features(inputs)
    if sizes is None and feats is None:
        if found:
            raise mismatch("image tokens", found, 0, "LLaVA-NeXT needs pixel_values and image_sizes with image tokens")
        return []
    if sizes is not None:
        grids = [_grid_from_size(cfg, size, i) for i, size in enumerate(sizes.tolist())]
        counts = [s * s + r * (c + 1) for r, c in grids]
        if found != sum(counts):
            raise mismatch("image tokens", found, sum(counts),
                           f"per image {counts}; build the prompt with LlavaNextProcessor for these image sizes")
        items = _whole_images(sample_runs, counts, grids, s)
        if items is None:
            raise mismatch("image tokens in a run", found, sum(counts),
                           "image-token runs do not line up with the images' sizes")
        return items
    if feature_rows(feats) != found:
        raise mismatch("image tokens", found, feature_rows(feats),
                       "the pre-encoded image features have one row per image token")
    newline = model.model.image_newline
    flags = [_newline_flags(f, newline) for f in feats]
    grids = [_grid_from_features(f, s * s) for f in flags]
    counts = [s * s + r * (c + 1) for r, c in grids]
    whole = all(c == len(f) for c, f in zip(counts, flags)) and not any(
        lead[b] and rs and rs[0][0] == 0 for b, rs in enumerate(sample_runs))
    items = _whole_images(sample_runs, counts, grids, s) if whole else None
    return items if items is not None else _pieces(sample_runs, torch.cat(flags))


ADAPTER = FamilyAdapter(model_type="llava_next", visual_items=visual_items)
