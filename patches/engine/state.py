"""ForwardState: everything the hf_kan backend needs during ONE forward call.

The model-level hook builds it (layout of the new tokens, the cache and its ledger, the active patch runtimes) and
passes it down as the keyword argument ``hf_kan_state``; Transformers forwards keyword arguments to every decoder
layer, attention function and ``cache.update``. Nothing is stored globally or on modules, so two models, two
threads or two interleaved generations never share state.

Rows vs. keys: the *rows* of a layer are the original positions of the hidden-state rows entering it (all tokens of
this forward, unless a patch dropped some at an earlier layer boundary with ``drop_rows``); the *keys* of a layer are
the positions its cache holds (``cache.ledger``), or its rows when there is no cache.
"""

from __future__ import annotations

import weakref

import torch

from ...ops.attention import requested_backend
from .cache import HFKanCache
from .compute import AttentionMetadata, select_compute
from .config import PatchConfig
from .layout import TEXT, TokenLayout
from .masks import causal_is_trivial_at, metadata_mask

STATE_KWARG = "hf_kan_state"


class ForwardState:
    """Per-forward metadata and mask memo of the hf_kan backend."""

    def __init__(self, config: PatchConfig, layout: TokenLayout, cache: HFKanCache | None, runtimes: list,
                 seen_before: int, compute: str | None = None, model=None, windows: tuple[int | None, ...] = (),
                 widened: bool = False):
        self.config = config
        #: per decoder layer, its sliding window (``None`` = full causal attention); ``engine.windows``
        self.windows = windows
        #: some token's ``span_end`` reaches past its own position in this forward (``annotate_layout``, MMA)
        self.widened = widened
        # weak, so a state kept on an output or a (deep-copied) cache never holds or copies the model
        self._model = weakref.ref(model) if model is not None else None
        self.layout = layout
        self.cache = cache
        self.runtimes = runtimes
        self.seen_before = seen_before
        #: the requested attention backend (``"auto"``, ``"triton"``, ``"sdpa"``, ``"reference"``): ``compute``, else
        #: ``HF_KAN_ATTENTION_BACKEND``, read once per forward; ``engine.compute.select_compute`` decides per layer
        self.backend = requested_backend(compute)
        self._paths: dict = {}
        self._rows: list[tuple[int, torch.Tensor]] = []  # (from_layer, (B, T') positions; -1 = empty row)
        self._masks: dict = {}
        self._metadata: dict = {}
        self._key_layouts: dict = {}  # id(held) -> [held, its TokenLayout or None]; the reference keeps ids unique
        self.mask_runtimes = [r for r in runtimes if r.changes_mask(self)]
        self.layer_runtimes = [r for r in runtimes if r.uses_layer_hooks]
        self._layer_dependent = any(r.layer_dependent_mask for r in self.mask_runtimes)
        self.scratch: dict = {}  # per-forward storage for patches (e.g. VAR sink sets, pruning keep sets)
        self._padding: bool | None = None
        #: called when a runtime added during the forward needs the decoder-layer hooks (set by the model hook)
        self.needs_layer_hooks = None

    @property
    def model(self):
        """The top-level model running this forward (``None`` if unknown or gone); patches read their extra modules
        from it (DyVTE's routers)."""
        return self._model() if self._model is not None else None

    def add_runtime(self, runtime) -> None:
        """Add a runtime to this forward only (for experiments and tests; configured patches come from the config)."""
        self.runtimes.append(runtime)
        if runtime.changes_mask(self):
            self.mask_runtimes.append(runtime)
            self._layer_dependent |= runtime.layer_dependent_mask
            self._masks.clear()
        if runtime.uses_layer_hooks:
            self.layer_runtimes.append(runtime)
            if self.needs_layer_hooks is not None:
                self.needs_layer_hooks()

    def release(self) -> None:
        """Drop the per-forward memos (masks, key layouts) once the forward is over; the state itself may be kept on
        the output and the cache."""
        self._masks.clear()
        self._metadata.clear()
        self._key_layouts.clear()
        self.needs_layer_hooks = None

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of decoder layer ``layer_idx`` (``None``: full causal attention)."""
        return self.windows[layer_idx] if layer_idx < len(self.windows) else None

    def _any_padding(self) -> bool:
        """Whether a padding token is among this forward's keys (the ledger's, or the layout's without a cache)."""
        if self._padding is None:
            if self.cache is not None:
                self._padding = self.cache.ledger.has_padding
            else:
                self._padding = not bool(self.layout.valid.all())
        return self._padding

    # --- rows ------------------------------------------------------------------------------------------------
    def drop_rows(self, from_layer: int, positions: torch.Tensor) -> None:
        """From layer ``from_layer`` on, the hidden-state rows are the tokens at original ``positions`` (``(B, T')``,
        -1 for an empty row in samples that keep fewer tokens). The caller shortens the hidden states itself."""
        self._rows = [(k, v) for k, v in self._rows if k < from_layer] + [(from_layer, positions)]
        self._masks.clear()
        self._metadata.clear()

    def row_positions(self, layer_idx: int) -> torch.Tensor | None:
        """``(B, T_l)`` original positions of the rows entering layer ``layer_idx``; ``None`` = all new tokens."""
        current = None
        for start, pos in self._rows:
            if start <= layer_idx:
                current = pos
        return current

    def query_layout(self, layer_idx: int) -> TokenLayout:
        rows = self.row_positions(layer_idx)
        if rows is None:
            return self.layout
        return self.layout.gather(torch.where(rows >= 0, rows - self.seen_before, -1))

    # --- keys ------------------------------------------------------------------------------------------------
    def _held(self, layer_idx: int, key_length: int) -> tuple[torch.Tensor | None, object]:
        """The ledger's held positions of the layer (checked against ``key_length``) and the memo key of that key
        set. Layers holding the same positions share one tensor object (see ``KVLedger``), so layouts and masks are
        built once per group of layers; ``_key_layouts`` keeps each tensor alive, so its id stays unique."""
        ledger = self.cache.ledger
        ledger.check(layer_idx, key_length)
        held = ledger.key_positions(layer_idx)
        if held is None:
            return None, ("held", None, key_length)
        hit = self._key_layouts.get(id(held))
        if hit is None or hit[0] is not held:
            self._key_layouts[id(held)] = [held, None]
        return held, ("held", id(held), key_length)

    def key_layout(self, layer_idx: int, key_length: int) -> tuple[TokenLayout, object]:
        """Layout of the layer's keys and a memo key identifying that key set."""
        if self.cache is None:
            rows = self.row_positions(layer_idx)
            return self.query_layout(layer_idx), ("rows", None if rows is None else id(rows))
        held, kkey = self._held(layer_idx, key_length)
        if held is None:
            return self.cache.ledger.tokens, kkey
        entry = self._key_layouts[id(held)]
        if entry[1] is None:
            entry[1] = self.cache.ledger.tokens.gather(held)
        return entry[1], kkey

    def _key_positions(self, layer_idx: int, key_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, S)`` original positions and validity of the layer's keys (what ``key_layout(...).position`` and
        ``.valid`` give), gathering only these two fields."""
        if self.cache is None:
            k = self.key_layout(layer_idx, key_length)[0]
            return k.position, k.valid
        tokens = self.cache.ledger.tokens
        held, _ = self._held(layer_idx, key_length)
        if held is None:
            return tokens.position, tokens.valid
        safe = held.clamp(min=0)
        hole = held < 0
        position = torch.gather(tokens.position, 1, safe).masked_fill(hole, -1)
        return position, torch.gather(tokens.valid, 1, safe) & ~hole

    def _layer_group(self, layer_idx: int, key_length: int) -> tuple[torch.Tensor | None, object, int | None]:
        """``(rows, key memo key, window)`` of the layer: layers equal in all three share masks and metadata."""
        if self.cache is None:
            kkey = self.key_layout(layer_idx, key_length)[1]
        else:
            kkey = self._held(layer_idx, key_length)[1]
        return self.row_positions(layer_idx), kkey, self.window(layer_idx)

    def compute_path(self, query: torch.Tensor, *, var: bool, grad: bool, blocker: str | None) -> str:
        """``engine.compute.select_compute`` for a layer call of this forward, memoised on its arguments (the text
        layers of one forward share device, dtype and head dim), so a decode step decides once, not per layer."""
        key = (var, grad, blocker)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = select_compute(self.backend, query, var=var, grad=grad, blocker=blocker,
                                                     patched=bool(self.runtimes))
        return path

    # --- kernel metadata ---------------------------------------------------------------------------------------
    def attention_metadata(self, layer_idx: int, key_length: int) -> AttentionMetadata:
        """What the fused kernel reads instead of ``mask_for``'s mask: the query rows' and keys' original positions,
        key validity, the MMA spans (when some span reaches past its token) and the layer's window; the arguments of
        ``visibility_mask``, the rule ``mask_for`` evaluates. Memoised across layers that share rows, keys and
        window. ``mask_rule`` s are not expressible here (the backend runs such layers on SDPA)."""
        rows, kkey, window = self._layer_group(layer_idx, key_length)
        memo = (None if rows is None else id(rows), kkey, window)
        hit = self._metadata.get(memo)
        if hit is None:
            q, k = self.query_layout(layer_idx), self.key_layout(layer_idx, key_length)[0]
            spans = self.widened
            hit = self._metadata[memo] = AttentionMetadata(
                q.position, k.position, k.valid, q.span_end if spans else None, (k.modality == TEXT) if spans else None,
                window)
        return hit

    # --- masks -----------------------------------------------------------------------------------------------
    def mask_for(self, layer_idx: int, key_length: int) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)`` for layer ``layer_idx``: a ``(B, 1, T, S)`` bool mask (``engine.masks``: causal by
        original position, padding, the layer's window, ``span_end`` widening, then the runtimes' ``mask_rule``), or
        ``None`` with ``is_causal`` telling SDPA to apply plain causal masking. Memoised across layers that share
        rows, keys and window."""
        rows, kkey, window = self._layer_group(layer_idx, key_length)
        memo = (None if rows is None else id(rows), kkey, window, layer_idx if self._layer_dependent else None)
        hit = self._masks.get(memo)
        if hit is not None:
            return hit
        q = self.query_layout(layer_idx)
        if not self.mask_runtimes and not self.widened and self._plain_causal(layer_idx, key_length, rows, kkey,
                                                                             window, q):
            result = (None, q.length > 1)
        else:
            k = self.key_layout(layer_idx, key_length)[0]
            allowed = metadata_mask(q, k, window, spans=self.widened)
            for rt in self.mask_runtimes:
                allowed = rt.mask_rule(self, layer_idx, q, k, allowed)
            result = (allowed[:, None], False)
        self._masks[memo] = result
        return result

    def _plain_causal(self, layer_idx: int, key_length: int, rows, kkey, window, q: TokenLayout) -> bool:
        """Whether the layer's mask is plain causal attention aligned at the end (SDPA needs no mask). When no row was
        dropped and the layer holds every token, the positions are consecutive columns, so only the lengths, the
        padding flag and the window need checking (no tensor work: the decode-step path)."""
        if rows is None and kkey[1] is None:
            t, s = q.length, key_length
            if t not in (1, s) or self._any_padding():
                return False
            return window is None or self.seen_before + t - 1 < window
        return causal_is_trivial_at(q.position, *self._key_positions(layer_idx, key_length), window)


__all__ = ["STATE_KWARG", "ForwardState"]
