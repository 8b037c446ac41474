"""TokenLayout: what every position of a multimodal sequence is, computed once per forward.

Layout tensors are never modified in place (several fields may share one tensor); derive new ones instead.

A ``TokenLayout`` is a set of ``(batch, length)`` tensors, one value per sample and position:

- ``modality``: ``TEXT`` (0), ``IMAGE`` (1), ``VIDEO`` (2) or ``PAD`` (3);
- ``position``: the ORIGINAL position, i.e. the column index in the full, unpruned token sequence (counted from the
  first token of the first forward, padding included); causality is decided on it, so it survives token dropping;
- ``image_index``: which visual item (image or video, in order of appearance within the sample) a token belongs to,
  ``-1`` for text and padding;
- ``grid``, ``row``, ``col``: where the token sits in that item's token grid. ``grid`` is the sub-grid (LLaVA-NeXT:
  0 = base image, 1 = high-resolution grid; Qwen: the temporal index; LLaVA: 0, or -1 for a CLS token); ``row`` and
  ``col`` are raster coordinates inside that sub-grid, ``-1`` where unknown or not on a grid;
- ``newline``: LLaVA-NeXT's image-newline tokens (``row`` = the row they end, ``col`` = -1);
- ``span_end``: per-token visibility metadata: the last original position a token may see beyond causality.
  ``build_layout`` sets it to ``position``; a patch that widens visibility fills it in
  ``PatchRuntime.annotate_layout`` (MMA: a visual token's span reaches the end of the first assistant-turn opener
  after its image).

Everything else (masks, key validity, the per-layer cache ledger) is derived from these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

TEXT, IMAGE, VIDEO, PAD = 0, 1, 2, 3
MODALITY_NAMES = {TEXT: "text", IMAGE: "image", VIDEO: "video", PAD: "padding"}
_NAME_TO_MODALITY = {"image": IMAGE, "video": VIDEO}


@dataclass
class TokenLayout:
    """Per-sample, per-position metadata of a token sequence (all fields ``(B, T)`` tensors on one device)."""

    modality: torch.Tensor
    position: torch.Tensor
    image_index: torch.Tensor
    grid: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    newline: torch.Tensor
    span_end: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.modality.shape[0]

    @property
    def length(self) -> int:
        return self.modality.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """``(B, T)`` bool: the position holds a real token (not padding)."""
        return self.modality != PAD

    @property
    def visual(self) -> torch.Tensor:
        """``(B, T)`` bool: image or video token."""
        return (self.modality == IMAGE) | (self.modality == VIDEO)

    def _map(self, fn) -> TokenLayout:
        return TokenLayout(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def gather(self, index: torch.Tensor) -> TokenLayout:
        """The layout at ``index`` (``(B, S)`` column indices into this layout; entries < 0 give padding slots
        with position -1)."""
        safe = index.clamp(min=0)
        out = self._map(lambda t: torch.gather(t, 1, safe))
        hole = index < 0
        if bool(hole.any()):
            out.modality = out.modality.masked_fill(hole, PAD)
            out.position = out.position.masked_fill(hole, -1)
            out.span_end = out.span_end.masked_fill(hole, -1)
        return out

    def cat(self, other: TokenLayout) -> TokenLayout:
        """This layout followed by ``other`` along the sequence."""
        return TokenLayout(**{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)], 1)
                              for f in dataclasses.fields(self)})

    def select_batch(self, index: torch.Tensor) -> TokenLayout:
        """Samples ``index`` (beam reordering, batch selection)."""
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, repeats: int) -> TokenLayout:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def narrow(self, start: int, length: int) -> TokenLayout:
        return self._map(lambda t: t.narrow(1, start, length))

    def empty_like(self, length: int) -> TokenLayout:
        """An uninitialised layout of ``length`` positions with this one's batch size, dtypes and device (a buffer for
        :meth:`write`)."""
        return self._map(lambda t: t.new_empty((t.shape[0], length)))

    def write(self, start: int, other: TokenLayout) -> None:
        """Copy ``other`` into positions ``[start, start + other.length)`` of this layout, in place (only for buffers
        made by :meth:`empty_like`; layouts handed to patches are never modified)."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).narrow(1, start, other.length).copy_(getattr(other, f.name))

    def to(self, device) -> TokenLayout:
        return self._map(lambda t: t.to(device))

    def describe(self, sample: int = 0) -> list[str]:
        """Human-readable per-position labels of one sample (for debugging and docs)."""
        out = []
        for t in range(self.length):
            m = int(self.modality[sample, t])
            label = MODALITY_NAMES[m]
            if m in (IMAGE, VIDEO):
                label += f"[{int(self.image_index[sample, t])}]"
                r, c = int(self.row[sample, t]), int(self.col[sample, t])
                label += "nl" if bool(self.newline[sample, t]) else f"({r},{c})"
            out.append(label)
        return out


@dataclass
class VisualItem:
    """The tokens of one image or video in one sample, as a family adapter reports them.

    ``start`` is the column of its first token in the current forward's ``input_ids``; ``grid``, ``row``, ``col``
    and ``newline`` are 1-D tensors with one entry per token of the item (its tokens are contiguous). When a forward
    boundary cuts an item (a chunked prefill), ``start`` may be negative (the item began in an earlier forward) and
    the item may run past the forward's last column: ``build_layout`` keeps the part inside the forward. Coordinates
    an adapter cannot know for such a part are ``-1``.
    """

    sample: int
    start: int
    modality: int
    grid: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    newline: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.row.numel())


def modality_codes(names) -> tuple[int, ...]:
    """Map modality names (``"image"``, ``"video"``) to layout codes."""
    return tuple(_NAME_TO_MODALITY[n] for n in names)


def runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the maximal runs of True in a 1-D bool tensor."""
    if mask_row.numel() == 0:
        return []
    m = mask_row.to(torch.int8)
    edges = torch.diff(torch.cat([m.new_zeros(1), m, m.new_zeros(1)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, stops))


def raster(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of a ``rows x cols`` grid in raster order."""
    idx = torch.arange(rows * cols)
    return idx // cols, idx % cols


class TextLayoutConstants:
    """Read-only tensors, per device, that text-only layouts are views of (a decode step's layout then allocates only
    its ``modality``): 0-d ``TEXT`` / ``PAD`` / ``-1`` / ``False`` and a ``0..N-1`` range that grows as needed."""

    def __init__(self):
        self._by_device: dict = {}

    def get(self, device: torch.device, length: int) -> dict[str, torch.Tensor]:
        c = self._by_device.get(device)
        if c is None or c["range"].numel() < length:
            c = {"text": torch.tensor(TEXT, dtype=torch.int8, device=device),
                 "pad": torch.tensor(PAD, dtype=torch.int8, device=device),
                 "minus": torch.tensor(-1, dtype=torch.long, device=device),
                 "false": torch.tensor(False, device=device),
                 "range": torch.arange(max(2 * length, 4096), dtype=torch.long, device=device)}
            self._by_device[device] = c
        return c


def text_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, offset: int = 0,
                constants: TextLayoutConstants | None = None) -> tuple[TokenLayout, bool]:
    """``(layout, padded)`` of a forward without visual tokens (every decode step): expanded views of ``constants``
    (only a batch with padding allocates its ``modality``), and whether any of its tokens is padding."""
    b, t = input_ids.shape
    device = input_ids.device
    c = (constants or TextLayoutConstants()).get(device, offset + t)
    views = c.get((b, t))
    if views is None:  # (b, t) views of the constants; t is 1 for every decode step
        views = c[(b, t)] = (c["text"].expand(b, t), c["minus"].expand(b, t), c["false"].expand(b, t))
    text, minus, false = views
    mask = None if attention_mask is None else attention_mask[:, -t:]
    padded = mask is not None and not bool(mask.all())
    modality = torch.where(mask.to(device=device, dtype=torch.bool), c["text"], c["pad"]) if padded else text
    position = c["range"][offset:offset + t].expand(b, t)
    return TokenLayout(modality, position, minus, minus, minus, minus, false, position), padded


def build_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    items: list[VisualItem],
    offset: int = 0,
    constants: TextLayoutConstants | None = None,
) -> TokenLayout:
    """Assemble a ``TokenLayout`` for the tokens of one forward.

    ``attention_mask`` is the 2-D padding mask whose LAST ``T`` columns describe these tokens; ``offset`` is the
    number of tokens seen by earlier forwards (so ``position = offset + column``). Visual tokens come from ``items``;
    everything else valid is text. A text-only layout is made of expanded views of ``constants`` when given.
    """
    b, t = input_ids.shape
    device = input_ids.device
    if not items:
        return text_layout(input_ids, attention_mask, offset, constants)[0]
    modality = torch.full((b, t), TEXT, dtype=torch.int8)
    if attention_mask is not None:
        valid = attention_mask[:, -t:].to("cpu", torch.bool)
        modality[~valid] = PAD
    minus = torch.full((b, t), -1, dtype=torch.long)
    image_index, grid, row, col = minus.clone(), minus.clone(), minus.clone(), minus.clone()
    newline = torch.zeros((b, t), dtype=torch.bool)
    counters = [0] * b
    for item in items:
        # an item may start before this forward (a run the previous forward cut) or end after it (cut here): keep the
        # part inside [0, t)
        lo, hi = max(0, -item.start), min(item.length, t - item.start)
        if hi <= lo:
            continue
        sl, part = slice(item.start + lo, item.start + hi), slice(lo, hi)
        modality[item.sample, sl] = item.modality
        image_index[item.sample, sl] = counters[item.sample]
        counters[item.sample] += 1
        grid[item.sample, sl] = item.grid[part]
        row[item.sample, sl] = item.row[part]
        col[item.sample, sl] = item.col[part]
        newline[item.sample, sl] = item.newline[part]
    position = (torch.arange(t, dtype=torch.long) + offset).expand(b, t).clone()
    span_end = position.clone()
    layout = TokenLayout(modality, position, image_index, grid, row, col, newline, span_end)
    return layout.to(device) if device.type != "cpu" else layout


__all__ = [
    "IMAGE",
    "PAD",
    "TEXT",
    "VIDEO",
    "TextLayoutConstants",
    "TokenLayout",
    "VisualItem",
    "build_layout",
    "text_layout",
    "raster",
    "runs",
]
