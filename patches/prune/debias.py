"""Attention debiasing for visual-token pruning ("Attention Debiasing for Token Pruning in VLMs", 2025).

Attention-based importance scores are biased (1) by position: tokens late in the visual sequence get more attention
(recency), and (2) toward image-processor padding (uniform patches act as attention sinks). Two corrections:

- **Positional trend**: divide each visual token's score by ``T(i) = exp(-b * i)``, ``i`` = the token's index in its
  sample's visual sequence (``T(0) = 1``). ``b`` is fitted ONCE per model on a handful of calibration inputs by
  :func:`fit_trend` / ``hf_kan.patches.calibrate_trend`` (least squares on the log scores with one offset per
  sample) and stored in ``PruneConfig.trend``; it is never fitted on evaluation data.
- **Padding suppression**: a visual token whose patch covers more than ``padding_threshold`` of padding gets score 0
  and the keep count is capped at the number of real tokens, so padding is never kept while real tokens remain.
  Padding exists for LLaVA-1.5 with expand-to-square (``LlavaImageProcessor(do_pad=True)``): the image is centred on
  a square of the mean colour, which normalises to ~0 in every channel. LLaVA-NeXT unpads its high-resolution grid
  in the model and resizes (does not pad) its base image, and Qwen2-VL/2.5-VL tile the real image only: a no-op there.

  The padding of each patch is measured from the ORIGINAL image size (:func:`size_padding_fractions`, the geometry of
  expand-to-square, as the authors' pad mask does from width and height) whenever the sizes are known. Measuring it
  from the pixels (:func:`image_padding_fractions`, the fallback) under-counts: after the processor's bicubic resize
  the one or two pixel rows at the inner edge of a padding band mix padding with ringing and count as real, so a
  patch row that is mostly padding can come out below the threshold.
"""

from __future__ import annotations

import torch

from ...errors import InputLayoutError

#: |normalised pixel| below this in every channel counts as expand-to-square padding (the fill is the processor's
#: mean colour rounded to 8 bits, which normalises to at most ~0.015 in magnitude for CLIP statistics).
PAD_TOLERANCE = 0.02


def positional_trend(index: torch.Tensor, b: float) -> torch.Tensor:
    """``T(i) = exp(-b * i)`` for visual indices ``i`` (float32)."""
    return torch.exp(-float(b) * index.float())


def visual_index(visual: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` long: each position's index in its sample's visual sequence (``-1`` for non-visual positions)."""
    idx = visual.long().cumsum(-1) - 1
    return torch.where(visual, idx, -1)


def image_padding_fractions(pixel_values: torch.Tensor, patch_size: int, tol: float = PAD_TOLERANCE) -> torch.Tensor:
    """``(N, s, s)`` fraction of each patch of each (square) image that is expand-to-square padding.

    The real image is the box between the first and last pixel row (column) that is not entirely padding-coloured;
    expand-to-square only adds uniform bands outside it, so an image with a mean-grey region inside stays real."""
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != pixel_values.shape[-2]:
        raise InputLayoutError(
            f"padding suppression expects square LLaVA pixel_values (N, C, S, S), got {tuple(pixel_values.shape)}"
        )
    n, _, size, _ = pixel_values.shape
    s = size // patch_size
    flat = pixel_values.abs().amax(1) >= tol  # (N, S, S): a non-padding pixel
    rows_real, cols_real = flat.any(-1), flat.any(-2)  # (N, S)
    out = torch.zeros(n, s, s)
    ar = torch.arange(size)
    for k in range(n):
        r, c = rows_real[k].nonzero().flatten(), cols_real[k].nonzero().flatten()
        if r.numel() == 0:  # an all-padding image
            out[k] = 1.0
            continue
        in_r = ((ar >= r.min()) & (ar <= r.max())).float().view(s, patch_size).mean(-1)  # (s,)
        in_c = ((ar >= c.min()) & (ar <= c.max())).float().view(s, patch_size).mean(-1)
        out[k] = 1.0 - in_r[:, None] * in_c[None, :]
    return out


def size_padding_fractions(image_sizes, grid: int) -> torch.Tensor:
    """``(N, grid, grid)`` fraction of each patch of each image that is expand-to-square padding, from the ORIGINAL
    image sizes ``image_sizes`` (``(N, 2)``: height, width per image).

    Expand-to-square pastes an ``h x w`` image at ``((S - w) // 2, (S - h) // 2)`` on an ``S x S`` square
    (``S = max(h, w)``) and the square is resized to the model's input, so the real image covers rows
    ``[y0, y0 + h] / S`` and columns ``[x0, x0 + w] / S`` of it, and patch ``(r, c)`` covers
    ``[r, r + 1] / grid x [c, c + 1] / grid``. Its padding fraction is ``1 - share_r(r) * share_c(c)``, where
    ``share_r(r) = grid * |[r, r + 1] / grid  intersected with  [y0, y0 + h] / S|`` (``share_c`` likewise)."""
    sizes = torch.as_tensor(image_sizes)
    if sizes.ndim != 2 or sizes.shape[-1] != 2 or sizes.is_floating_point() or bool((sizes <= 0).any()):
        raise InputLayoutError(
            f"image_sizes must be (height, width) pairs of positive integers, one per image; got {image_sizes!r}"
        )
    sizes = sizes.to(torch.float64)
    h, w = sizes[:, 0], sizes[:, 1]
    side = torch.maximum(h, w)
    edges = torch.arange(grid + 1, dtype=torch.float64) / grid  # patch borders on the unit square

    def share(length):  # (N, grid): the part of each patch row (column) inside the pasted image
        start = torch.floor((side - length) / 2) / side
        stop = start + length / side
        lo = torch.maximum(edges[None, :-1], start[:, None])
        hi = torch.minimum(edges[None, 1:], stop[:, None])
        return (hi - lo).clamp(min=0) * grid

    return (1.0 - share(h)[:, :, None] * share(w)[:, None, :]).float()


def token_padding_fractions(layout, fractions: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` padding fraction of every position of ``layout`` (0 for text and tokens off the grid), reading the
    per-image tables ``fractions`` (``(N, s, s)``, images in order of appearance over the batch, as LLaVA merges
    them)."""
    img = layout.image_index
    per_sample = (img.amax(-1) + 1).clamp(min=0)
    first = torch.cumsum(per_sample, 0) - per_sample
    global_img = img + first[:, None]
    on_grid = layout.visual & (img >= 0) & (layout.row >= 0) & (layout.col >= 0)
    if bool(on_grid.any()) and int(global_img[on_grid].max()) >= fractions.shape[0]:
        raise InputLayoutError(
            f"padding suppression got fractions for {fractions.shape[0]} image(s) but the prompt has more images"
        )
    if bool(on_grid.any()) and (int(layout.row[on_grid].max()) >= fractions.shape[1]
                                or int(layout.col[on_grid].max()) >= fractions.shape[2]):
        raise InputLayoutError(
            f"padding suppression got {tuple(fractions.shape[1:])} patch tables but the images have a larger token "
            "grid; build the padding cache for this model (hf_kan.patches.padding_cache(model, ...))"
        )
    f = fractions.to(layout.row.device)
    g = global_img.clamp(min=0).clamp(max=f.shape[0] - 1)
    r = layout.row.clamp(min=0, max=f.shape[1] - 1)
    c = layout.col.clamp(min=0, max=f.shape[2] - 1)
    vals = f[g, r, c]
    return torch.where(on_grid, vals, 0.0)


def debias_scores(scores: torch.Tensor, index: torch.Tensor, padding: torch.Tensor | None, b: float,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Debiased visual scores ``s_i / T(i)`` with padding tokens (``padding > threshold``) set to 0. Returns the
    scores and the ``(B, T)`` bool padding-token mask (``None`` without padding information)."""
    out = scores / positional_trend(index.clamp(min=0), b) if b else scores
    if padding is None:
        return out, None
    is_pad = padding > threshold
    return out.masked_fill(is_pad, 0.0), is_pad


def fit_trend(scores: list[torch.Tensor]) -> float:
    """Fit ``b`` of ``T(i) = exp(-b i)`` to visual-token scores (one 1-D tensor per sample, in visual order) by least
    squares on ``log s[n, i] = a_n - b i`` with a free offset ``a_n`` per sample (so samples of different lengths and
    score scales pool without bias): ``b = -sum_n sum_i (i - mean_n i)(y - mean_n y) / sum_n sum_i (i - mean_n i)^2``
    with ``y = log s``. ``T(0) = 1`` by construction."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for s in scores:
        s = s.double().flatten()
        if s.numel() < 2:
            continue
        i = torch.arange(s.numel(), dtype=torch.float64)
        y = s.clamp(min=1e-30).log()
        di = i - i.mean()
        num += (di * (y - y.mean())).sum()
        den += (di * di).sum()
    if float(den) == 0.0:
        raise InputLayoutError("fit_trend needs the scores of at least one sample with two or more visual tokens")
    return float(-num / den)


__all__ = ["PAD_TOLERANCE", "debias_scores", "fit_trend", "image_padding_fractions", "positional_trend",
           "size_padding_fractions", "token_padding_fractions", "visual_index"]
