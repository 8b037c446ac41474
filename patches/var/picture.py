"""Looking at what VAR does: record its sink tokens and selections during a forward, and draw them on the image.

``record_var(model)`` is a context manager that collects, for every forward run inside it, the sink flags of every
VAR layer (by original position), the (head, query) rows VAR selected and, for one chosen layer, the attention
probabilities before and after redistribution. ``plot_var(...)`` runs one forward and writes a PNG with three panels
over one image of one sample: the layer's sink tokens, and the chosen head's attention (from one query) on the image
tokens before and after redistribution.

    from hf_kan.patches import plot_var
    plot_var(model, inputs, "var.png", layer=10, head=3, image=pil_image)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import HFKanConfigError, InputLayoutError
from ..engine.state import STATE_KWARG
from .runtime import TRACE_KEY


@contextlib.contextmanager
def record_var(model: nn.Module, keep_probs_layer: int | None = None) -> Iterator[dict]:
    """Collect VAR diagnostics of the forwards run inside the block (each forward replaces the previous record).

    Yields a dict that after a forward holds ``"state"`` (the ``ForwardState``), ``"sinks"`` (layer -> ``(B, N)``
    bool sink flags by original position) and ``"layers"`` (layer -> ``{"selected": [(first_row, (B, H, t) bool)],
    "before"/"after": [(first_row, (B, H, t, S) probabilities)] (``keep_probs_layer`` only)}``, one entry per query
    chunk; ``assemble`` joins them). Call after ``hf_kan.patches.apply(model, var=...)``, so the hf_kan hook runs
    first.
    """
    trace: dict[str, Any] = {"keep_probs_layer": keep_probs_layer}

    def hook(module, args, kwargs):
        state = kwargs.get(STATE_KWARG)
        if state is None:
            raise InputLayoutError("record_var found no hf_kan state: call hf_kan.patches.apply(model, var=...) "
                                   "before entering record_var")
        for key in ("sinks", "layers"):
            trace.pop(key, None)
        trace["state"] = state
        state.scratch[TRACE_KEY] = trace
        return None

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield trace
    finally:
        handle.remove()


def assemble(trace: dict, layer: int, which: str) -> torch.Tensor:
    """One recorded quantity of ``layer`` over all its query rows: ``which`` is ``"selected"`` (``(B, H, T)`` bool) or
    ``"before"`` / ``"after"`` (``(B, H, T, S)`` probabilities). Rows the backend did not compute explicitly (those
    before the first query VAR may change) are False / NaN."""
    chunks = trace.get("layers", {}).get(layer, {}).get(which)
    if not chunks:
        raise InputLayoutError(
            f"VAR recorded no {which!r} for layer {layer} in this forward (not a VAR layer, no query after an image, "
            "or record_var(keep_probs_layer=...) names another layer)"
        )
    first = chunks[0][1]
    shape = list(first.shape)
    shape[2] = trace["state"].query_layout(layer).length
    out = torch.full(shape, False if first.dtype == torch.bool else float("nan"), dtype=first.dtype)
    for start, chunk in chunks:
        out[:, :, start:start + chunk.shape[2]] = chunk
    return out


def var_maps(model: nn.Module, inputs: dict, layer: int, head: int, sample: int = 0, image_index: int = 0,
             query: int = -1) -> dict[str, Any]:
    """Run one forward and return, on the base token grid of image ``image_index`` of ``sample``:
    ``sinks`` (rows x cols bool, VAR sink tokens entering ``layer``), ``before`` / ``after`` (rows x cols float, the
    attention of ``head`` from query column ``query`` to each image token, before and after redistribution), and
    ``selected`` (whether that (head, query) row was redistributed)."""
    with record_var(model, keep_probs_layer=layer) as trace, torch.no_grad():
        model(**inputs)
    state = trace["state"]
    before, after = assemble(trace, layer, "before"), assemble(trace, layer, "after")
    if not 0 <= head < before.shape[1]:
        raise HFKanConfigError(f"head {head} does not exist: layer {layer} has {before.shape[1]} heads")
    q_lay = state.query_layout(layer)
    if state.cache is not None:
        k_lay = state.cache.ledger.key_layout(layer)
    else:
        k_lay = q_lay
    in_image = (k_lay.image_index[sample] == image_index) & k_lay.visual[sample] & (k_lay.grid[sample] <= 0)
    in_image &= ~k_lay.newline[sample] & (k_lay.row[sample] >= 0)
    if not bool(in_image.any()):
        raise InputLayoutError(f"sample {sample} has no image {image_index} among layer {layer}'s keys")
    rows, cols = k_lay.row[sample][in_image], k_lay.col[sample][in_image]
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    positions = k_lay.position[sample][in_image]
    qi = query % q_lay.length
    if bool(before[sample, head, qi].isnan().any()):
        raise InputLayoutError(f"the query at column {qi} comes before the image: VAR never changes it")
    selected = assemble(trace, layer, "selected")[sample, head, qi]
    out = {"selected": bool(selected), "query_position": int(q_lay.position[sample, qi]), "layer": layer,
           "head": head}
    sink_flags = trace["sinks"][layer][sample, positions]
    for name, values in (("sinks", sink_flags.float()), ("before", before[sample, head, qi, in_image]),
                         ("after", after[sample, head, qi, in_image])):
        grid = torch.zeros(shape)
        grid[rows, cols] = values.float().cpu()
        out[name] = grid.bool() if name == "sinks" else grid
    return out


def plot_var(model: nn.Module, inputs: dict, path: str | Path, layer: int, head: int, image=None, sample: int = 0,
             image_index: int = 0, query: int = -1) -> dict[str, Any]:
    """Write a PNG (three panels: sink tokens, attention before, attention after VAR) of ``head`` in ``layer`` for
    the query at column ``query`` (default the last prompt token), over ``image`` (a PIL image or ``(H, W, 3)``
    array; a grey canvas when ``None``). Returns the maps of ``var_maps``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    maps = var_maps(model, inputs, layer, head, sample, image_index, query)
    canvas = np.full((maps["sinks"].shape[0] * 16, maps["sinks"].shape[1] * 16, 3), 0.6) if image is None else \
        np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    h, w = canvas.shape[:2]
    extent = (0, w, h, 0)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    vmax = float(max(maps["before"].max(), maps["after"].max())) or 1.0
    panels = (("sink tokens", None), ("attention before VAR", "before"), ("attention after VAR", "after"))
    grey = canvas.astype(float).mean(-1) if canvas.ndim == 3 else canvas.astype(float)
    r, c = maps["sinks"].shape
    for ax, (title, key) in zip(axes, panels):
        if key is None:
            ax.imshow(canvas, extent=extent)
        else:  # the heat map over a grey copy of the image, so colours read as attention only
            ax.imshow(grey, extent=extent, cmap="gray")
            im = ax.imshow(maps[key].numpy(), extent=extent, alpha=0.75, cmap="inferno", vmin=0.0, vmax=vmax,
                           interpolation="nearest")
        for i, j in maps["sinks"].nonzero().tolist():
            ax.add_patch(plt.Rectangle((j * w / c, i * h / r), w / c, h / r, fill=False, edgecolor="red",
                                       lw=2 if key is None else 1, linestyle="-" if key is None else ":"))
        ax.set_title(title)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes[1:]), fraction=0.03)
    fig.suptitle(f"layer {layer}, head {head}, query position {maps['query_position']}: "
                 f"{'redistributed' if maps['selected'] else 'not selected (unchanged)'}; "
                 f"{int(maps['sinks'].sum())} visual sink tokens")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return maps


__all__ = ["assemble", "plot_var", "record_var", "var_maps"]
