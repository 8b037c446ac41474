"""Dynamic visual-token exit, DyVTE ("Dynamic Visual Token Exit", arXiv 2411.19628), on the token-dropping mechanism.

After each configured decoder layer ``l`` a small router reads, per sample,

    f_l = [ mean of the hidden states of the text tokens after the (first) image ; hidden state of the last prompt
            token ]                                                                      (2h features, layer output)
    p(exit) = softmax(W2 GELU(W1 f_l))[1]              W1: (r, 2h), W2: (2, r), no biases (authors: r = 2048)

and at the first layer where ``p(exit) > threshold`` ALL of that sample's visual tokens leave: ``dropping.drop_visual``
removes them from the hidden states before layer ``l + 1`` and from the caches of layers ``l + 1 ..``; text keeps its
original positions. "Text after the image" stops at the last prompt token (with teacher-forced answers the answer is
excluded); a sample with no text after its image uses the last prompt token for both halves.

Batches: every sample exits at its own layer. Rows of samples that exited earlier become empty (``-1``) slots,
left-filled by the dropping mechanism, so a padded batch computes what each sample computes alone. Only forwards that
contain visual tokens run routers (the prefill); decode steps attend to each layer's cached positions.

Routers are parameters of the model: a ``DyVTERouters`` module attached as the attribute ``hf_kan_dyvte`` of the
top-level model, so ``save_pretrained`` writes them into the model's safetensors under the prefix
``hf_kan_dyvte.routers.<layer>.``. ``from_pretrained`` builds the model from its config without them (Transformers
reports these keys as unexpected and skips them); ``hf_kan.patches.apply(model)`` (or
``hf_kan.patches.from_pretrained``) re-creates the module from the saved ``dyvte`` config and loads those keys from
the checkpoint named by ``config._name_or_path``. The last router layer starts at zero, so untrained routers output
``p(exit) = 0.5`` and never exit at the paper's threshold.

The record of a forward is ``output.hf_kan_state.scratch["dyvte"]`` (``cache.hf_kan_prefill_state`` after
``generate``): ``exit_layer`` ``(B,)`` (``-1`` = never exited) and ``p_exit`` ``{layer: (B,)}``. Tokens per layer,
FLOPs and KV bytes after exits: ``hf_kan.patches.efficiency_report(model, output)``.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn
from transformers.utils import logging

from ..errors import HFKanConfigError, InputLayoutError
from .dropping import check_no_labels, current_rows, drop_visual
from .dyvte_config import DyVTEConfig
from .layout import TokenLayout
from .runtime import PatchRuntime
from .state import STATE_KWARG

logger = logging.get_logger(__name__)

#: attribute of the top-level model holding the ``DyVTERouters`` (also the state-dict prefix)
ROUTERS_ATTRIBUTE = "hf_kan_dyvte"
#: key of ``ForwardState.scratch`` under which the model hook puts the routers for the runtime
_SCRATCH_ROUTERS = "dyvte_routers"
KEEP, EXIT = 0, 1


class DyVTERouter(nn.Module):
    """One layer's router: ``Linear(2h, r) -> GELU -> Linear(r, 2)`` without biases; logits ``[keep, exit]``."""

    def __init__(self, hidden_size: int, router_hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(2 * hidden_size, router_hidden, bias=False, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(router_hidden, 2, bias=False, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``fc1``: PyTorch's default Linear init; ``fc2``: zeros, so an untrained router gives ``p(exit) = 0.5``."""
        self.fc1.reset_parameters()
        nn.init.zeros_(self.fc2.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features.to(self.fc1.weight.dtype))))


class DyVTERouters(nn.Module):
    """The routers of every eligible layer, ``routers[str(layer)]``."""

    def __init__(self, hidden_size: int, router_hidden: int, layers, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.router_hidden = router_hidden
        self.routers = nn.ModuleDict({str(i): DyVTERouter(hidden_size, router_hidden, device, dtype) for i in layers})

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(int(k) for k in self.routers))

    def forward(self, features: torch.Tensor, layers: torch.Tensor | int) -> torch.Tensor:
        """``(N, 2)`` logits ``[keep, exit]`` of ``features`` ``(N, 2h)``, each row through the router of its layer
        (``layers``: one int or ``(N,)``)."""
        if isinstance(layers, int):
            return self.routers[str(layers)](features)
        out = features.new_zeros(features.shape[0], 2, dtype=torch.float32)
        for layer in layers.unique().tolist():
            sel = layers == layer
            out[sel] = self.routers[str(layer)](features[sel]).float()
        return out


# --------------------------------------------------------------------------------------------- router features


def router_features(hidden: torch.Tensor, layout: TokenLayout, last: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 2h)`` router input from a layer's output ``hidden`` ``(B, T, h)`` whose rows have metadata ``layout``:
    ``[mean over the real text rows after the sample's first visual row, up to and including its last prompt row ;
    hidden state of the last prompt row]``. ``last`` ``(B,)`` gives the last prompt row (default: the last real
    row). With no text after the image (or no image) the mean is replaced by the last prompt row's state."""
    b, t, _ = hidden.shape
    idx = torch.arange(t, device=hidden.device)[None]
    valid = layout.valid.to(hidden.device)
    visual = layout.visual.to(hidden.device)
    if last is None:
        last = torch.where(valid, idx, -1).max(-1).values
    last = last.to(hidden.device)
    if bool((last < 0).any()):
        raise InputLayoutError("DyVTE router features: a sample has no real token")
    first_visual = torch.where(visual, idx, t).min(-1).values
    text = valid & ~visual & (idx > first_visual[:, None]) & (idx <= last[:, None])
    count = text.sum(-1, keepdim=True)
    last_state = hidden[torch.arange(b, device=hidden.device), last]
    mean = (hidden * text[..., None].to(hidden.dtype)).sum(1) / count.clamp(min=1).to(hidden.dtype)
    mean = torch.where(count > 0, mean, last_state)
    return torch.cat([mean, last_state], -1)


# --------------------------------------------------------------------------------------------- runtime


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
            routers = state.scratch.get(_SCRATCH_ROUTERS)
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


# --------------------------------------------------------------------------------------------- routers on the model


def routers_of(model: nn.Module) -> DyVTERouters | None:
    """The model's ``DyVTERouters`` (``None`` if DyVTE was never applied)."""
    return getattr(model, ROUTERS_ATTRIBUTE, None)


def router_hook(model, args, kwargs):
    """Forward pre-hook registered after the patch engine's model hook: hands the routers to this forward's state."""
    state = kwargs.get(STATE_KWARG)
    if state is not None and state.config.dyvte is not None:
        state.scratch[_SCRATCH_ROUTERS] = routers_of(model)
    return None


def _checkpoint_router_tensors(path) -> dict[str, torch.Tensor]:
    """Router tensors (keys relative to the routers module) stored in the safetensors checkpoint at ``path`` (a
    directory written by ``save_pretrained``, sharded or not; a Hub id only if already in the local cache)."""
    from safetensors import safe_open

    if not path:
        return {}
    path = str(path)
    files: list[str] = []
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = {v for k, v in json.load(f)["weight_map"].items() if f"{ROUTERS_ATTRIBUTE}." in k}
            files = [os.path.join(path, s) for s in sorted(shards)]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = [os.path.join(path, "model.safetensors")]
    else:
        try:
            from transformers.utils import cached_file

            found = cached_file(path, "model.safetensors", local_files_only=True,
                                _raise_exceptions_for_missing_entries=False)
            files = [found] if found else []
        except Exception:  # not a local path nor a cached Hub repo: nothing to load
            files = []
    marker = f"{ROUTERS_ATTRIBUTE}."
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if marker in key:
                    out[key.split(marker, 1)[1]] = f.get_tensor(key)
    return out


def attach_routers(model: nn.Module, config: DyVTEConfig | None, checkpoint=None) -> DyVTERouters | None:
    """Make sure ``model`` carries routers matching ``config`` (``layers``, ``router_hidden``): existing ones are kept;
    missing ones are created (zero last layer: never exit) and, when the model was loaded from a checkpoint
    (``checkpoint``, default ``model.config._name_or_path``), filled from its saved ``hf_kan_dyvte.*`` tensors.
    ``config=None`` leaves the model as it is."""
    if config is None:
        return routers_of(model)
    text_config = model.config.get_text_config()
    hidden = text_config.hidden_size
    current = routers_of(model)
    if current is not None and current.hidden_size == hidden and current.router_hidden == config.router_hidden:
        missing = [i for i in config.layers if str(i) not in current.routers]
        if not missing:
            return current
    ref = model.get_input_embeddings().weight
    fresh = DyVTERouters(hidden, config.router_hidden, config.layers, device=ref.device, dtype=ref.dtype)
    reused = set()
    if current is not None and current.router_hidden == config.router_hidden and current.hidden_size == hidden:
        for key, router in current.routers.items():
            if key in fresh.routers:
                fresh.routers[key] = router
                reused.add(key)
    saved = _checkpoint_router_tensors(checkpoint if checkpoint is not None else
                                       getattr(model.config, "_name_or_path", None))
    if saved:
        state = {k: v for k, v in saved.items() if k.split(".")[1] not in reused}
        own = fresh.state_dict()
        bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if bad:
            raise HFKanConfigError(
                f"saved DyVTE router tensors {bad[:3]} do not match dyvte.router_hidden={config.router_hidden}; "
                "the checkpoint's config and weights disagree"
            )
        fresh.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        loaded = {k.split(".")[1] for k in state if k in own}
        untrained = sorted(int(k) for k in fresh.routers if k not in loaded and k not in reused)
        if untrained:
            logger.warning("DyVTE: no saved router for layer(s) %s; they start untrained (never exit)", untrained)
    elif len(reused) < len(fresh.routers):
        logger.warning("DyVTE: routers for layer(s) %s are new and untrained (p(exit) = 0.5: they never exit at "
                       "threshold 0.5); train them with `hf-kan dyvte-train` or dyvte_train.train_routers",
                       sorted(int(k) for k in fresh.routers if k not in reused))
    model.add_module(ROUTERS_ATTRIBUTE, fresh)
    return fresh


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


@contextlib.contextmanager
def extra_runtime(model: nn.Module, runtime: PatchRuntime):
    """Within the block, every forward of ``model`` (patched with ``apply``) also runs ``runtime``."""
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: _add(kwargs, runtime), with_kwargs=True)
    try:
        yield runtime
    finally:
        handle.remove()


def _add(kwargs, runtime):
    state = kwargs.get(STATE_KWARG)
    if state is None:
        raise InputLayoutError("this forward has no hf_kan state: call hf_kan.patches.apply(model) first")
    state.add_runtime(runtime)
    runtime.begin_forward(state, kwargs)
    return None


def mask_visual_after(model: nn.Module, exit_layer: torch.Tensor | int, batch_size: int | None = None):
    """Context manager: forwards of ``model`` mask every visual key in layers after ``exit_layer`` (an int, or per
    sample ``(B,)`` with ``-1`` = none): the masked simulation of a DyVTE exit."""
    if isinstance(exit_layer, int):
        if batch_size is None:
            raise HFKanConfigError("mask_visual_after with one int layer needs batch_size")
        exit_layer = torch.full((batch_size,), exit_layer, dtype=torch.long)
    return extra_runtime(model, VisualKeyMask(exit_layer))


__all__ = ["DyVTERouter", "DyVTERouters", "DyVTERuntime", "ROUTERS_ATTRIBUTE", "VisualKeyMask", "attach_routers",
           "exit_layers", "extra_runtime", "mask_visual_after", "router_features", "router_hook", "routers_of"]
