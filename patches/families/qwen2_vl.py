"""Qwen2-VL (``qwen2_vl``): ``<|vision_start|>``, then ``t * (h/m) * (w/m)`` copies of ``image_token_id``
(``video_token_id`` for video) in raster order over (t, h/m, w/m), then ``<|vision_end|>``; ``(t, h, w)`` is the
item's row of ``image_grid_thw`` / ``video_grid_thw`` (patches before merging), ``m = spatial_merge_size``.

Inside ``generate`` the grids never reach ``forward``; the grid coordinates are then read from the M-RoPE position
ids ``generate`` passes (rows t/h/w, minus the item's first position). In a chunked prefill, the part of an item that
continues one the previous forward cut has unknown coordinates (its first position is in the earlier forward); the
part a forward cuts at its end keeps them.
"""

from __future__ import annotations

import torch

from ..engine.layout import IMAGE, VIDEO, VisualItem, raster
from .base import FamilyAdapter, mismatch, split_runs, unknown_coordinates


def _from_thw(t: int, h: int, w: int, m: int):
    hm, wm = h // m, w // m
    rows, cols = raster(hm, wm)
    grid = torch.arange(t).repeat_interleave(hm * wm)
    return grid, rows.repeat(t), cols.repeat(t)


def _from_positions(pos3: torch.Tensor, b: int, start: int, stop: int):
    t_ids, h_ids, w_ids = (pos3[i, b, start:stop].cpu().long() for i in range(3))
    grid = torch.unique(t_ids, return_inverse=True)[1]
    return grid, h_ids - h_ids.min(), w_ids - w_ids.min()


def visual_items(model, input_ids: torch.Tensor, inputs: dict, lead: list[int] | None = None) -> list[VisualItem]:
    lead = lead or [0] * input_ids.shape[0]
    cfg = model.config
    m = cfg.vision_config.spatial_merge_size
    pos = inputs.get("position_ids")
    pos3 = pos[-3:] if pos is not None and pos.ndim == 3 and pos.shape[0] in (3, 4) else None
    items = []
    for modality, token_id, key in ((IMAGE, cfg.image_token_id, "image_grid_thw"),
                                    (VIDEO, cfg.video_token_id, "video_grid_thw")):
        thw = inputs.get(key)
        sample_runs = split_runs(input_ids, token_id)
        n_runs = sum(len(rs) for rs in sample_runs)
        what = "image" if modality == IMAGE else "video"
        if thw is not None:
            thw = thw.tolist()
            if len(thw) != n_runs:
                raise mismatch(f"{what} blocks", n_runs, len(thw),
                               f"{key} lists {len(thw)} {what}(s); each needs one <|vision_start|>...<|vision_end|> "
                               "block (separate adjacent blocks by a text token)")
        k = 0
        for b, rs in enumerate(sample_runs):
            for start, stop in rs:
                newline = torch.zeros(stop - start, dtype=torch.bool)
                if thw is None and start == 0 and lead[b]:  # continues an item the previous forward cut
                    grid, rows, cols, _ = unknown_coordinates(stop - start)
                elif thw is not None:
                    t, h, w = thw[k]
                    need = t * (h // m) * (w // m)
                    if need != stop - start:
                        raise mismatch(f"{what} tokens in block {k}", stop - start, need,
                                       f"{key}[{k}] = {thw[k]} gives t*(h/{m})*(w/{m}) = {need} tokens")
                    grid, rows, cols = _from_thw(t, h, w, m)
                elif pos3 is not None:
                    grid, rows, cols = _from_positions(pos3, b, start, stop)
                else:  # coordinates unknown (e.g. inputs_embeds-only calls): modality and spans are still exact
                    grid = rows = cols = torch.full((stop - start,), -1, dtype=torch.long)
                items.append(VisualItem(b, start, modality, grid, rows, cols, newline))
                k += 1
    items.sort(key=lambda it: (it.sample, it.start))
    return items


ADAPTER = FamilyAdapter(model_type="qwen2_vl", visual_items=visual_items)
