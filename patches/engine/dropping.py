"""Dropping tokens between decoder layers: the one mechanism every token-reduction method (pruning, DyVTE) uses.

At a layer boundary (``PatchRuntime.before_layer`` of layer ``l``) a runtime chooses, per sample, which of the
current hidden-state rows survive and calls :func:`drop_tokens` (or :func:`drop_visual` to remove every visual row,
DyVTE's exit). That

- gathers the surviving rows of the hidden states (rows keep their original order; samples that keep fewer rows get
  empty rows, position ``-1``, at the LEFT, so row ``-1`` is always each sample's last real token);
- records the kept original positions with ``state.drop_rows(l, positions)``, so from layer ``l`` on the attention
  masks are built for these rows and ``HFKanCache.update`` records them in the cache ledger: layers ``>= l`` cache
  only kept positions, earlier layers keep everything, and decoding continues at the original positions;
- input padding rows are dropped too (they carry nothing).

The decoder loop hands every layer the FULL-length ``position_embeddings`` (cos, sin; Qwen's M-RoPE sections are
already merged into them) and ``position_ids``; :func:`sync_layer_inputs` (called by the layer hook after the
runtimes' ``before_layer``) slices them to the current rows, so kept tokens keep their original rotary positions.

Consequence for users: after a drop the model's logits (and ``output_hidden_states`` of later layers) have one row
per KEPT token, not per input token. ``generate`` only reads the last row and is unaffected; training with ``labels``
would misalign and is refused (``check_no_labels``).
"""

from __future__ import annotations

import torch

from ...errors import InputLayoutError


def current_rows(state, layer_idx: int) -> torch.Tensor:
    """``(B, T_l)`` original positions of the rows entering layer ``layer_idx`` (``-1`` = empty row)."""
    rows = state.row_positions(layer_idx)
    if rows is not None:
        return rows
    lay = state.layout
    return lay.position


def keep_index(keep: torch.Tensor) -> torch.Tensor:
    """``(B, T')`` row indices of the True entries of a ``(B, T)`` bool ``keep``, in order, left-filled with ``-1``
    where a sample keeps fewer rows than the widest sample."""
    counts = keep.sum(-1)
    width = int(counts.max()) if keep.numel() else 0
    # stable sort puts dropped rows first and kept rows after them, each group in the original order
    order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices[:, keep.shape[1] - width:]
    slot = torch.arange(width, device=keep.device)[None, :]
    return torch.where(slot >= (width - counts)[:, None], order, -1)


def drop_tokens(state, layer_idx: int, hidden_states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep only the rows where ``keep`` (``(B, T_l)`` bool over the rows entering layer ``layer_idx``) is True, from
    layer ``layer_idx`` on; returns the shortened hidden states ``(B, T', D)`` to hand to the layer.

    Call it from ``PatchRuntime.before_layer(state, layer_idx, hidden_states, kwargs)`` and return its result. Rows
    that are padding (input padding or earlier empty rows) are always dropped."""
    rows = current_rows(state, layer_idx)
    if keep.shape != rows.shape:
        raise InputLayoutError(
            f"drop_tokens at layer {layer_idx}: keep has shape {tuple(keep.shape)} but {tuple(rows.shape)} rows "
            "enter that layer"
        )
    real = state.layout.gather(torch.where(rows >= 0, rows - state.seen_before, -1)).valid
    idx = keep_index(keep & real)
    safe = idx.clamp(min=0)
    positions = torch.where(idx >= 0, torch.gather(rows, 1, safe), -1)
    out = torch.gather(hidden_states, 1, safe[..., None].expand(-1, -1, hidden_states.shape[-1]))
    out = out.masked_fill((idx < 0)[..., None], 0.0)
    state.drop_rows(layer_idx, positions)
    return out


def drop_visual(state, layer_idx: int, hidden_states: torch.Tensor,
                samples: torch.Tensor | None = None) -> torch.Tensor:
    """Remove EVERY visual (image/video) row from layer ``layer_idx`` on (DyVTE's exit); text keeps its original
    positions. ``samples`` (``(B,)`` bool) restricts the exit to some samples of the batch (default: all)."""
    rows = current_rows(state, layer_idx)
    lay = state.layout.gather(torch.where(rows >= 0, rows - state.seen_before, -1))
    drop = lay.visual if samples is None else lay.visual & samples[:, None].to(lay.visual.device)
    return drop_tokens(state, layer_idx, hidden_states, ~drop)


def _gather_cols(t: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with its sequence dimension ``dim`` gathered at ``cols`` (``(B, T')``), batch broadcast if it is 1."""
    b = cols.shape[0]
    if dim == 1:  # (B or 1, T, ...)
        if t.shape[0] != b:
            t = t.expand(b, *t.shape[1:])
        index = cols.view(b, -1, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:])
        return torch.gather(t, 1, index)
    # (R, B or 1, T): multi-row position ids
    if t.shape[1] != b:
        t = t.expand(t.shape[0], b, t.shape[2])
    return torch.gather(t, 2, cols[None].expand(t.shape[0], -1, -1))


def sync_layer_inputs(state, layer_idx: int, kwargs: dict) -> None:
    """Slice the full-length ``position_embeddings`` and ``position_ids`` in a decoder layer's ``kwargs`` to the rows
    entering it (no-op when nothing was dropped). Called once per layer by the layer hook, after every runtime's
    ``before_layer``."""
    rows = state.row_positions(layer_idx)
    if rows is None:
        return
    full = state.layout.length
    cols = torch.where(rows >= 0, rows - state.seen_before, 0)
    pe = kwargs.get("position_embeddings")
    if isinstance(pe, (tuple, list)) and pe and pe[0].shape[-2] == full:
        kwargs["position_embeddings"] = tuple(_gather_cols(t, cols.to(t.device), 1) for t in pe)
    pid = kwargs.get("position_ids")
    if isinstance(pid, torch.Tensor) and pid.shape[-1] == full:
        if pid.ndim == 2:
            kwargs["position_ids"] = _gather_cols(pid, cols.to(pid.device), 1)
        elif pid.ndim == 3:
            kwargs["position_ids"] = _gather_cols(pid, cols.to(pid.device), 2)


def check_no_labels(inputs: dict, what: str) -> None:
    """Refuse ``labels`` in a forward that drops tokens: the logits would cover only kept rows."""
    if inputs.get("labels") is not None:
        raise InputLayoutError(
            f"{what} drops tokens between decoder layers, so the logits cover only the kept rows and training labels "
            "would misalign; it is meant for inference. Turn it off for training (e.g. hf_kan.patches.apply(model, "
            "prune=False)) or compute the loss yourself from the kept rows"
        )


__all__ = ["check_no_labels", "current_rows", "drop_tokens", "drop_visual", "keep_index", "sync_layer_inputs"]
