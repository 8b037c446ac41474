"""Optional first stage: teach the vision tower and projector what is in each grid cell, before the language model.

Each image token (one patch) is labelled with the content of the grid cell that holds the patch centre
(``0`` for an empty cell, else ``1 + colour_index * len(SHAPES) + shape_index``) and with its own index in the
patch grid. Two temporary linear heads on the projected image features (exactly what the language model receives)
are trained with the sum of the two cross-entropies for a few hundred steps, then dropped. The language model then
starts from image tokens whose colour, shape and position are linearly readable, instead of waiting for its own
gradient to shape a randomly initialised tower. (Position matters: with rotary position embeddings the values the
language model reads carry no position, so "is the circle left of the square?" needs it in the features.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..data.shapes_vqa import COLOURS, GRID, SHAPES

NUM_CELL_CLASSES = 1 + len(COLOURS) * len(SHAPES)


def cell_labels(objects: Sequence[dict[str, Any]], image_size: int, patch_size: int) -> torch.Tensor:
    """``[(image_size // patch_size) ** 2]`` class of each patch, in raster order (see the module docstring)."""
    grid = image_size // patch_size
    cell = image_size / GRID
    content = {(o["row"], o["col"]): 1 + list(COLOURS).index(o["colour"]) * len(SHAPES) + SHAPES.index(o["shape"])
               for o in objects}
    centres = (torch.arange(grid) * patch_size + patch_size / 2) // cell
    return torch.tensor([content.get((int(r), int(c)), 0) for r in centres for c in centres])


def pretrain_vision(
    model: Any,
    draw_rows: Callable[[int], list[dict[str, Any]]],
    image_processor: Any,
    steps: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Train ``model``'s vision tower and projector on per-patch cell classes for ``steps`` AdamW steps.

    ``draw_rows(step)`` returns the training rows of a step. Returns the loss of every step. Only the tower and
    projector change; the heads live for this call only.
    """
    llava = model.model
    config = model.config.vision_config
    params = [p for m in (llava.vision_tower, llava.multi_modal_projector) for p in m.parameters()
              if p.requires_grad]
    hidden = model.config.text_config.hidden_size
    num_tokens = (config.image_size // config.patch_size) ** 2
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, NUM_CELL_CLASSES), torch.nn.Linear(hidden, num_tokens)])
    heads.to(device)
    optimizer = torch.optim.AdamW([*params, *heads.parameters()], lr=learning_rate, weight_decay=0.0)
    positions = torch.arange(num_tokens, device=device)
    was_training = model.training
    model.train()
    losses = []
    for step in range(steps):
        rows = draw_rows(step)
        pixels = image_processor([r["image"] for r in rows], return_tensors="pt")["pixel_values"].to(device)
        labels = torch.stack([cell_labels(r["objects"], config.image_size, config.patch_size) for r in rows])
        features = llava.get_image_features(pixel_values=pixels, vision_feature_layer=model.config.vision_feature_layer,
                                            vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        features = torch.stack(features.pooler_output)  # [B, tokens, text hidden]
        cross_entropy = torch.nn.functional.cross_entropy
        loss = cross_entropy(heads[0](features).flatten(0, 1), labels.flatten().to(device)) + cross_entropy(
            heads[1](features).flatten(0, 1), positions.repeat(len(rows)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.train(was_training)
    return losses


__all__ = ["NUM_CELL_CLASSES", "cell_labels", "pretrain_vision"]
