"""A picture of what pruning kept: the kept visual tokens overlaid on the input image (PNG).

``kept_token_grid`` turns a forward's record into a ``(rows, cols)`` bool grid for one image (LLaVA: its ``s x s``
grid; LLaVA-NeXT: the base grid or, with ``grid=1``, the high-resolution grid; Qwen2-VL/2.5-VL: the merged
``h/m x w/m`` grid of temporal slice ``grid``), and ``plot_kept_tokens`` draws the image with dropped tokens dimmed
and kept ones outlined. The token grid is stretched over the image given, so pass the image as the model saw it
(e.g. after LLaVA's expand-to-square) for an exact overlay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import InputLayoutError


def kept_token_grid(state, sample: int = 0, image_index: int = 0, grid: int = 0,
                    kept_positions: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, cols)`` bool: which tokens of image ``image_index`` of ``sample`` survive to the last decoder layer
    of the forward whose ``ForwardState`` is ``state`` (``output.hf_kan_state``, or ``cache.hf_kan_prefill_state``
    after ``generate``). ``kept_positions`` (``(B, T')`` original positions) overrides that, e.g. a stage's keep set
    from ``state.scratch["prune"]["kept"][stage]``."""
    lay = state.layout
    if kept_positions is None:
        kept_positions = _last_rows(state)
    sel = (lay.image_index[sample] == image_index) & (lay.grid[sample] == grid) & lay.visual[sample]
    sel &= (lay.row[sample] >= 0) & (lay.col[sample] >= 0)
    if not bool(sel.any()):
        raise InputLayoutError(f"sample {sample} has no grid tokens for image {image_index} (sub-grid {grid})")
    rows, cols = lay.row[sample][sel], lay.col[sample][sel]
    pos = lay.position[sample][sel]
    if kept_positions is None:
        kept = torch.ones_like(pos, dtype=torch.bool)
    else:
        kp = kept_positions[sample].to(pos.device)
        kept = torch.isin(pos, kp[kp >= 0])
    out = torch.zeros(int(rows.max()) + 1, int(cols.max()) + 1, dtype=torch.bool)
    out[rows.cpu(), cols.cpu()] = kept.cpu()
    return out


def _last_rows(state):
    """Rows after the last drop point (they are the rows of every later layer), or ``None`` if nothing dropped."""
    starts = [start for start, _ in state._rows]
    return state.row_positions(max(starts)) if starts else None


def _as_array(image) -> np.ndarray:
    """An ``(H, W, 3)`` float array in [0, 1] from a PIL image, an ``(H, W, 3)`` array or a ``(3, H, W)`` tensor."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().float().cpu().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(image).astype(np.float64)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    arr = arr[..., :3]
    lo, hi = float(arr.min()), float(arr.max())
    if hi > 1.0 or lo < 0.0:  # uint8 or normalised pixels: rescale for display
        arr = (arr - lo) / max(hi - lo, 1e-12)
    return arr


def overlay(image, kept: torch.Tensor, dim: float = 0.2) -> np.ndarray:
    """The image as ``(H, W, 3)`` floats with the cells of dropped tokens multiplied by ``dim``."""
    arr = _as_array(image).copy()
    h, w = arr.shape[:2]
    rows, cols = kept.shape
    r_edges = np.linspace(0, h, rows + 1).round().astype(int)
    c_edges = np.linspace(0, w, cols + 1).round().astype(int)
    for r in range(rows):
        for c in range(cols):
            if not bool(kept[r, c]):
                arr[r_edges[r]:r_edges[r + 1], c_edges[c]:c_edges[c + 1]] *= dim
    return arr


def plot_kept_tokens(image, kept: torch.Tensor, path: str | Path | None = None, title: str | None = None,
                     dim: float = 0.2):
    """Draw ``image`` with the dropped tokens of the ``(rows, cols)`` grid ``kept`` dimmed and the token grid
    outlined; save a PNG to ``path`` if given. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    arr = overlay(image, kept, dim)
    h, w = arr.shape[:2]
    rows, cols = kept.shape
    fig, ax = plt.subplots(figsize=(5, 5 * h / max(w, 1)))
    ax.imshow(arr, interpolation="nearest", extent=(0, w, h, 0))
    for r in np.linspace(0, h, rows + 1):
        ax.axhline(r, color="white", linewidth=0.3, alpha=0.5)
    for c in np.linspace(0, w, cols + 1):
        ax.axvline(c, color="white", linewidth=0.3, alpha=0.5)
    n_kept = int(kept.sum())
    ax.set_title(title or f"kept {n_kept} / {kept.numel()} visual tokens")
    ax.set_axis_off()
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


__all__ = ["kept_token_grid", "overlay", "plot_kept_tokens"]
