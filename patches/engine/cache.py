"""The per-layer cache ledger and the cache class that carries it.

``KVLedger`` records, for a whole generation, the ``TokenLayout`` of every token seen so far (the *token table*,
indexed by original position) and, per decoder layer, which original positions that layer's KV cache holds:

- ``held[l] is None``: the layer holds every token seen, in order (the normal, unpruned case; no tensor kept);
- otherwise ``held[l]`` is a ``(B, S_l)`` long tensor of original positions, one per cached key slot, with ``-1``
  marking empty slots (samples that keep fewer tokens than others in the batch).

Token dropping (issue 7) makes later layers hold a subset; the attention backend reads each layer's key metadata
from the ledger, so masks stay correct with shorter per-layer caches, batch > 1 and padding.

``HFKanCache`` is a ``DynamicCache`` that owns a ledger: ``update`` appends the positions of the rows it receives,
and beam reordering, batch selection, repetition and cropping keep the ledger in step with the tensors.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ...errors import InputLayoutError
from .layout import PAD, TEXT, TokenLayout


class KVLedger:
    """Which original positions each layer's cache holds, plus the layout of every token seen so far."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        # The token table lives in a buffer with spare capacity whose unused columns already hold what a plain text
        # token has there (text, position = span_end = its column, no image, no grid), so appending a decode step's
        # token writes nothing (or one ``modality`` column, with padding); ``tokens`` is a view of the filled part,
        # made when first read after an append. Views are narrowed to the length at their creation: later appends
        # never change a view handed out.
        self._buffer: TokenLayout | None = None
        self._view: TokenLayout | None = None
        self._seen = 0
        self.held: list[torch.Tensor | None] = [None] * num_layers
        # Per-token data of patches, indexed by original position: name -> (B, N, ...) tensor with N <= seen (VAR's
        # sink flags). Kept in step with beam reordering, batch selection and crop.
        self.token_data: dict[str, torch.Tensor] = {}
        # Layers that hold the same positions share ONE tensor object (e.g. every layer after a drop): appends made
        # in one forward are memoised on (previous tensor, appended rows), so a group stays one object, and it
        # splits by itself when a layer gets different rows (copy-on-divergence; held tensors are never mutated in
        # place). Consumers (ForwardState's mask and key-layout memos) then do their work once per group.
        self._appended: dict = {}
        #: some token seen so far is padding (kept by ``extend``, recomputed by batch operations)
        self._padding = False

    @property
    def tokens(self) -> TokenLayout | None:
        """The ``TokenLayout`` of every token seen so far, indexed by original position (``None`` before any)."""
        if self._view is None and self._buffer is not None:
            self._view = self._buffer.narrow(0, self._seen)
        return self._view

    @tokens.setter
    def tokens(self, layout: TokenLayout | None) -> None:
        self._buffer = self._view = layout
        self._seen = 0 if layout is None else layout.length
        self._padding = layout is not None and bool((layout.modality == PAD).any())

    @property
    def seen(self) -> int:
        """Number of original positions seen so far (the length of the token table)."""
        return self._seen

    @property
    def has_padding(self) -> bool:
        """Whether some token seen so far is padding (a Python flag kept up to date by ``extend``)."""
        return self._padding

    def _grow(self, like: TokenLayout, needed: int) -> TokenLayout:
        """A buffer for at least ``needed`` positions (doubling), its free columns prefilled as plain text tokens, with
        the current table copied in."""
        capacity = max(2 * needed, 64)
        b = like.batch_size
        buf = like.empty_like(capacity)
        buf.modality.fill_(TEXT)
        column = torch.arange(capacity, device=like.position.device).expand(b, -1)
        buf.position.copy_(column)
        buf.span_end.copy_(column)
        for t in (buf.image_index, buf.grid, buf.row, buf.col):
            t.fill_(-1)
        buf.newline.fill_(False)
        if self._seen:
            buf.write(0, self.tokens)
        return buf

    def extend(self, layout: TokenLayout, *, plain_text: bool | None = None) -> None:
        """Append the layout of a new forward's tokens (``build_layout`` of them, annotated) to the token table.
        ``plain_text`` (from ``text_layout``, nothing annotated): ``False`` = text tokens without padding, which the
        buffer's prefill already holds (nothing is written); ``True`` = text with padding (only ``modality`` is
        written); ``None`` = anything else."""
        n, t = self._seen, layout.length
        buf = self._buffer
        if buf is None or buf.batch_size != layout.batch_size or buf.length < n + t:
            self._buffer = buf = self._grow(layout, n + t)
        if plain_text is None:
            buf.write(n, layout)
            if not self._padding:  # once padding was seen the flag stays set: no check per forward
                self._padding = bool((layout.modality == PAD).any())
        elif plain_text:
            buf.modality.narrow(1, n, t).copy_(layout.modality)
            self._padding = True
        self._seen = n + t
        self._view = None
        self._appended.clear()

    def record(self, layer_idx: int, positions: torch.Tensor | None, seen_before: int, new: int) -> None:
        """Layer ``layer_idx`` appended the rows at original ``positions`` (``(B, T)``; ``None`` = all ``new`` tokens of
        the current forward, which start at ``seen_before``)."""
        prev = self.held[layer_idx]
        if positions is None and prev is None:
            return
        memo = (None if prev is None else id(prev), None if positions is None else id(positions), seen_before, new)
        hit = self._appended.get(memo)
        if hit is not None and hit[0] is prev and hit[1] is positions:
            self.held[layer_idx] = hit[2]
            return
        rows = positions
        if positions is None:
            b = self._buffer.batch_size
            positions = torch.arange(seen_before, seen_before + new, device=self._buffer.position.device).expand(b, -1)
        before = prev
        if before is None:
            b = positions.shape[0]
            before = torch.arange(seen_before, device=positions.device).expand(b, -1)
        out = torch.cat([before, positions], 1)
        self._appended[memo] = (prev, rows, out)  # the references keep the ids in ``memo`` unique
        self.held[layer_idx] = out

    def set_layer(self, layer_idx: int, positions: torch.Tensor | None) -> None:
        """Declare that layer ``layer_idx`` now holds ``positions`` (``(B, S)``, -1 = empty slot); used when tokens
        are dropped from a layer's cache."""
        self.held[layer_idx] = positions
        self._appended.clear()

    def key_positions(self, layer_idx: int) -> torch.Tensor | None:
        """``(B, S_l)`` original positions held by layer ``layer_idx``, or ``None`` when it holds every token."""
        return self.held[layer_idx]

    def key_layout(self, layer_idx: int) -> TokenLayout:
        """The layout of the keys in layer ``layer_idx``'s cache, slot by slot."""
        held = self.held[layer_idx]
        return self.tokens if held is None else self.tokens.gather(held)

    def check(self, layer_idx: int, key_length: int) -> None:
        expected = self.seen if self.held[layer_idx] is None else self.held[layer_idx].shape[1]
        if expected != key_length:
            raise InputLayoutError(
                f"layer {layer_idx}'s KV cache holds {key_length} keys but the hf_kan ledger expects {expected}; "
                "the cache was modified outside hf_kan (use the cache returned by the previous forward unchanged)"
            )

    # --- batch operations, mirrored from the cache -----------------------------------------------------------
    def _map_held(self, fn) -> None:
        """Apply ``fn`` to every held tensor once per distinct object, so layers sharing a tensor keep sharing."""
        done: dict[int, torch.Tensor] = {}
        for i, h in enumerate(self.held):
            if h is not None:
                if id(h) not in done:
                    done[id(h)] = fn(h)
                self.held[i] = done[id(h)]
        self._appended.clear()

    def _batch_map(self, fn) -> None:
        if self._buffer is not None:  # the whole buffer, so its prefilled spare columns stay usable
            self._buffer = self._buffer._map(fn)
            self._view = None
            self._padding = bool((self.tokens.modality == PAD).any())
        self._map_held(fn)
        self.token_data = {k: fn(v) for k, v in self.token_data.items()}

    def select_batch(self, index: torch.Tensor) -> None:
        self._batch_map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, repeats: int) -> None:
        self._batch_map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``tokens_to_remove`` tokens (they were appended to every layer, as decoding does)."""
        if tokens_to_remove <= 0 or self.tokens is None:
            return
        keep = self.seen - tokens_to_remove
        # a fresh table: appends after a crop must not overwrite what views handed out before it show
        self.tokens = self.tokens.narrow(0, keep)._map(torch.clone) if keep > 0 else None
        self._map_held(lambda h: h[:, : h.shape[1] - tokens_to_remove])
        self.token_data = {k: v[:, :keep] for k, v in self.token_data.items()}


class HFKanCache(DynamicCache):
    """A ``DynamicCache`` whose layers may hold different sets of original positions, tracked by ``self.ledger``.

    Created automatically by the hf_kan forward hook (a plain forward or ``generate`` never needs to build it), or
    by hand as ``HFKanCache(config=model.config.get_text_config())``.

    Every layer is a plain ``DynamicLayer`` that keeps all its keys, sliding-window layers included: the window is
    applied by the mask, by original position (``engine.masks``), which stays exact when layers hold different
    (pruned) key sets, where a ``DynamicSlidingWindowLayer`` would evict by slot count. The cost is the memory of the
    keys outside the window.
    """

    def __init__(self, *args, config=None, **kwargs):
        text = config.get_text_config() if config is not None else None
        n = getattr(text, "num_hidden_layers", None) or 0
        if n and not args and "ddp_cache_data" not in kwargs:
            kwargs["ddp_cache_data"] = [(None, None)] * n  # n empty full-attention layers, whatever the layer types
        super().__init__(*args, config=None, **kwargs)
        self.ledger = KVLedger(n)

    def _ensure_layers(self, layer_idx: int) -> None:
        while len(self.ledger.held) <= layer_idx:
            self.ledger.held.append(None)
            self.ledger.num_layers += 1

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Append keys/values as ``DynamicCache`` does, and record the original positions of the appended rows."""
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        state = (kwargs.get("kwargs") or {}).get("hf_kan_state")
        if state is not None and state.cache is self:
            self._ensure_layers(layer_idx)
            self.ledger.record(layer_idx, state.row_positions(layer_idx), state.seen_before, state.layout.length)
        return keys, values

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.ledger.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.ledger.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.ledger.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int):
        """Remove ``-tokens_to_remove`` tokens (a negative count, as ``DynamicCache.crop`` takes) from every layer."""
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self.ledger.crop(-tokens_to_remove)


__all__ = ["HFKanCache", "KVLedger"]
