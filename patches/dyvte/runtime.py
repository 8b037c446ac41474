"""Dynamic visual-token exit, DyVTE ("Dynamic Visual Token Exit", arXiv 2411.19628), on the engine's token dropping.

After each configured decoder layer ``l`` a small router (``routers.py``) reads, per sample,

    f_l = [ mean of the hidden states of the text tokens after the (first) image, EXCLUDING the last prompt token ;
            hidden state of the last prompt token ]                                      (2h features, layer output)
    p(exit) = softmax(W2 GELU(W1 f_l))[1]              W1: (r, 2h), W2: (2, r), no biases (authors: r = 2048)

(the features of the authors' release, so routers trained with their code load: ``release.py``) and at the first
layer where ``p(exit) > threshold`` ALL of that sample's visual tokens leave: ``engine.dropping.drop_visual`` removes
them from the hidden states before layer ``l + 1`` and from the caches of layers ``l + 1 ..``; text keeps its original
positions. The text mean covers the tokens between the image and the last prompt token (with teacher-forced answers
the answer is excluded too); a sample with no text there uses the last prompt token for both halves.

Batches: every sample exits at its own layer. Rows of samples that exited earlier become empty (``-1``) slots,
left-filled by the dropping mechanism, so a padded batch computes what each sample computes alone. Only forwards that
contain visual tokens run routers (the prefill); decode steps attend to each layer's cached positions. The runtime
reads the routers from the model running the forward (``state.model``).

The record of a forward is ``output.hf_kan_state.scratch["dyvte"]`` (``cache.hf_kan_prefill_state`` after
``generate``): ``exit_layer`` ``(B,)`` (``-1`` = never exited) and ``p_exit`` ``{layer: (B,)}``. Tokens per layer,
FLOPs and KV bytes after exits: ``hf_kan.patches.efficiency_report(model, output)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import HFKanConfigError, InputLayoutError
from ..engine.dropping import check_no_labels, current_rows, drop_visual
from ..engine.hooks import extra_runtime
from ..engine.runtime import PatchRuntime, visual_outside_last_chunk
from .config import DyVTEConfig
from .routers import router_features, routers_of

KEEP, EXIT = 0, 1


class DyVTERuntime(PatchRuntime):
    """Per-forward runtime of ``DyVTEConfig`` (registered as ``"dyvte"``): routers after layers, exits before the
    next one."""

    name = "dyvte"
    uses_layer_hooks = True

    def __init__(self, config: DyVTEConfig):
        super().__init__(config)
        self.eligible = set(config.layers or ())
        self.enabled = False
        self.pending: dict[int, torch.Tensor] = {}
        self.record: dict = {}

    def prefill_chunk_error(self, layout, starts):
        return visual_outside_last_chunk(layout, starts, "DyVTE")

    def begin_forward(self, state, inputs: dict) -> None:
        lay = state.layout
        self.enabled = bool(lay.visual.any())
        if not self.enabled:
            return
        check_no_labels(inputs, "DyVTE")
        self.has_visual = lay.visual.any(-1)
        self.record = {"exit_layer": torch.full((lay.batch_size,), -1, dtype=torch.long), "p_exit": {}}
        state.scratch["dyvte"] = self.record

    def after_layer(self, state, layer_idx, hidden_states):
        if not self.enabled or layer_idx not in self.eligible:
            return None
        exit_layer = self.record["exit_layer"]
        open_ = (exit_layer < 0) & self.has_visual.cpu()
        if not bool(open_.any()):
            return None
        if self.config.force_exit_layer is not None:
            decide = open_ & (layer_idx == self.config.force_exit_layer)
        else:
            routers = routers_of(state.model) if state.model is not None else None
            if routers is None:
                raise InputLayoutError(
                    "DyVTE is configured but the model carries no routers; call hf_kan.patches.apply(model) after "
                    "loading (it restores the saved routers)"
                )
            hidden = hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states
            rows = current_rows(state, layer_idx)
            lay = state.layout.gather(torch.where(rows >= 0, rows - state.seen_before, -1))
            with torch.no_grad():
                p = torch.softmax(routers(router_features(hidden, lay), layer_idx).float(), -1)[:, EXIT].cpu()
            self.record["p_exit"][layer_idx] = p
            decide = open_ & (p > self.config.threshold)
        if bool(decide.any()):
            exit_layer[decide] = layer_idx
            self.pending[layer_idx + 1] = decide
        return None

    def before_layer(self, state, layer_idx, hidden_states, kwargs):
        samples = self.pending.pop(layer_idx, None)
        if samples is None:
            return None
        return drop_visual(state, layer_idx, hidden_states, samples.to(hidden_states.device))


def exit_layers(output) -> torch.Tensor | None:
    """``(B,)`` layer after which each sample's visual tokens exited (``-1``: never) for a forward or ``generate``
    output of a DyVTE model; ``None`` when the forward had no visual tokens (no routers ran)."""
    state = getattr(output, "hf_kan_state", None)
    if state is None:
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        state = getattr(cache, "hf_kan_prefill_state", None)
    if state is None:
        raise InputLayoutError("exit_layers needs the output of a forward or generate of a model patched with DyVTE")
    rec = state.scratch.get("dyvte")
    return None if rec is None else rec["exit_layer"]


# --------------------------------------------------------------------------------------------- simulation by masking


class VisualKeyMask(PatchRuntime):
    """Reference exit by masking: in every layer ``> exit_layer[b]``, sample ``b``'s queries see no visual key (each
    query keeps its own key, so visual queries stay defined). ``exit_layer`` ``(B,)``, ``-1`` = no exit. Its text rows
    compute what an exit after ``exit_layer[b]`` computes (DyVTE's label rule simulates exits this way)."""

    name = "dyvte_mask"
    layer_dependent_mask = True

    def __init__(self, exit_layer: torch.Tensor):
        super().__init__(None)
        self.exit_layer = exit_layer

    def changes_mask(self, state) -> bool:
        return bool((self.exit_layer >= 0).any())

    def mask_rule(self, state, layer_idx, q, k, allowed):
        ex = self.exit_layer.to(allowed.device)
        hide = k.visual.to(allowed.device) & ((ex >= 0) & (layer_idx > ex))[:, None]
        own = q.position[:, :, None].to(allowed.device) == k.position[:, None, :].to(allowed.device)
        return allowed & (~hide[:, None, :] | own)


def mask_visual_after(model: nn.Module, exit_layer: torch.Tensor | int, batch_size: int | None = None):
    """Context manager: forwards of ``model`` mask every visual key in layers after ``exit_layer`` (an int, or per
    sample ``(B,)`` with ``-1`` = none): the masked simulation of a DyVTE exit."""
    if isinstance(exit_layer, int):
        if batch_size is None:
            raise HFKanConfigError("mask_visual_after with one int layer needs batch_size")
        exit_layer = torch.full((batch_size,), exit_layer, dtype=torch.long)
    return extra_runtime(model, VisualKeyMask(exit_layer))


__all__ = ["EXIT", "KEEP", "DyVTERuntime", "VisualKeyMask", "exit_layers", "mask_visual_after"]
