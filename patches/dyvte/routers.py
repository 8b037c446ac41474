"""DyVTE's routers as model parameters: one small MLP per eligible layer, attached to the top-level model.

A ``DyVTERouters`` module is the attribute ``hf_kan_dyvte`` of the top-level model, so ``save_pretrained`` writes the
routers into the model's safetensors under the prefix ``hf_kan_dyvte.routers.<layer>.``. ``from_pretrained`` builds
the model from its config without them (Transformers reports these keys as unexpected and skips them);
``hf_kan.patches.apply(model)`` (the DyVTE spec's ``attach``: :func:`attach_routers`) re-creates the module from the
saved ``dyvte`` config and loads those keys from the checkpoint named by ``config._name_or_path``. The last router
layer starts at zero, so untrained routers output ``p(exit) = 0.5`` and never exit at the paper's threshold.

``router_features`` is the routers' input (shared by inference and training).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers.utils import logging

from ...errors import HFKanConfigError, InputLayoutError
from ..engine.layout import TokenLayout
from .config import DyVTEConfig

logger = logging.get_logger(__name__)

#: attribute of the top-level model holding the ``DyVTERouters`` (also the state-dict prefix)
ROUTERS_ATTRIBUTE = "hf_kan_dyvte"


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


def router_features(hidden: torch.Tensor, layout: TokenLayout, last: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 2h)`` router input from a layer's output ``hidden`` ``(B, T, h)`` whose rows have metadata ``layout``,
    as the authors' release computes it:

        f = [ mean of the real text rows after the sample's first visual row and BEFORE its last prompt row ;
              hidden state of the last prompt row ]

    ``last`` ``(B,)`` gives the last prompt row (default: the last real row). With no text between the image and the
    last prompt row (or no image) the mean is replaced by the last prompt row's state (where the release would
    average nothing)."""
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
    text = valid & ~visual & (idx > first_visual[:, None]) & (idx < last[:, None])
    count = text.sum(-1, keepdim=True)
    last_state = hidden[torch.arange(b, device=hidden.device), last]
    mean = (hidden * text[..., None].to(hidden.dtype)).sum(1) / count.clamp(min=1).to(hidden.dtype)
    mean = torch.where(count > 0, mean, last_state)
    return torch.cat([mean, last_state], -1)


def routers_of(model: nn.Module) -> DyVTERouters | None:
    """The model's ``DyVTERouters`` (``None`` if DyVTE was never applied)."""
    return getattr(model, ROUTERS_ATTRIBUTE, None)


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
                       "threshold 0.5); train them with `hf-kan dyvte-train` or "
                       "hf_kan.patches.dyvte.train.train_routers",
                       sorted(int(k) for k in fresh.routers if k not in reused))
    model.add_module(ROUTERS_ATTRIBUTE, fresh)
    return fresh


__all__ = ["ROUTERS_ATTRIBUTE", "DyVTERouter", "DyVTERouters", "attach_routers", "router_features", "routers_of"]
