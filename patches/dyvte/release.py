"""Loading DyVTE routers trained with the authors' released code into hf-kan's ``hf_kan_dyvte`` routers.

The release (DyVTE on LLaVA-1.5) keeps one router per decoder layer inside its LLaVA checkpoint, under
``model.visual_gates_router.<i>.``: ``w1.weight`` ``(2048, 2h)`` and ``w2.weight`` ``(2, 2048)``, no biases, a GELU
between them (the dropout module it also defines is never applied). Its logits are ``[keep, exit]`` and it exits
after layer ``i`` when ``exit > keep``, i.e. ``p(exit) > 0.5``; its features are ``[mean of the text after the image
without the last prompt token ; last prompt token]`` at layer ``i``'s output, which is what hf-kan's routers read
(``routers.router_features``). So ``w1`` becomes ``hf_kan_dyvte.routers.<i>.fc1.weight``, ``w2`` ``...fc2.weight``,
and the threshold 0.5 reproduces the release's decisions. The release also has a router after the last layer, whose
exit would remove nothing; it is skipped.

The weights must come from a model with the same text stack as the one they are loaded into (the routers read its
hidden states); only the width of the features (``2h``) can be checked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch
from torch import nn
from transformers.utils import logging

from ...errors import HFKanConfigError
from ..api import apply
from .routers import ROUTERS_ATTRIBUTE, DyVTERouters, routers_of

logger = logging.get_logger(__name__)

#: a router tensor of the release: ``[prefix.]visual_gates_router.<layer>.<w1|w2>.weight``
RELEASED_KEY = re.compile(r"(?:^|\.)visual_gates_router\.(\d+)\.(w1|w2)\.weight$")
_NAMES = {"w1": "fc1", "w2": "fc2"}
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory that can hold router tensors (the shards the index names, else
    every ``.safetensors`` / ``.bin`` file)."""
    for name in _INDEXES:
        index = os.path.join(path, name)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            shards = {v for k, v in weight_map.items() if RELEASED_KEY.search(k)}
            return [os.path.join(path, s) for s in sorted(shards)]
    return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith((".safetensors", ".bin"))]


def _read_file(path: str) -> dict[str, torch.Tensor]:
    """The router tensors of one ``.safetensors`` or PyTorch (``.bin`` / ``.pt``) weight file."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if RELEASED_KEY.search(k)}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if RELEASED_KEY.search(k)}


def released_router_tensors(source) -> dict[int, dict[str, torch.Tensor]]:
    """``{layer: {"fc1": w1, "fc2": w2}}`` from the authors' router tensors in ``source``: a state dict, a weight file
    (``.safetensors`` / ``.bin`` / ``.pt``) or a checkpoint directory (sharded or not). Keys may carry any prefix
    before ``visual_gates_router.`` (``model.`` in their LLaVA checkpoints)."""
    if isinstance(source, Mapping):
        tensors = {k: v for k, v in source.items() if RELEASED_KEY.search(k)}
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        tensors = {}
        for file in _checkpoint_files(str(source)):
            tensors.update(_read_file(file))
    elif isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        tensors = _read_file(str(source))
    else:
        raise HFKanConfigError(
            f"released DyVTE routers are read from a state dict, a weight file or a checkpoint directory; got "
            f"{source!r}"
        )
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, name = RELEASED_KEY.search(key).groups()
        out.setdefault(int(layer), {})[_NAMES[name]] = value
    if not out:
        raise HFKanConfigError(f"no DyVTE router tensors (visual_gates_router.<layer>.w1/w2.weight) in {source!r}")
    incomplete = sorted(k for k, v in out.items() if len(v) != 2)
    if incomplete:
        raise HFKanConfigError(f"released DyVTE routers of layer(s) {incomplete} lack w1 or w2")
    return out


def load_released_routers(model: nn.Module, source, *, threshold: float | None = None) -> DyVTERouters:
    """Apply DyVTE to ``model`` with the routers of the authors' release read from ``source`` (see
    :func:`released_router_tensors`): their width (2048 for LLaVA-1.5), their layers (all but the model's last) and
    ``threshold`` (default: the current one, else 0.5, the release's rule ``p(exit) > 0.5``). Returns the routers;
    ``save_pretrained`` then stores them in hf-kan's layout."""
    tensors = released_router_tensors(source)
    text_config = model.config.get_text_config()
    hidden, num_layers = text_config.hidden_size, text_config.num_hidden_layers
    widths = {v["fc1"].shape[0] for v in tensors.values()}
    bad = [k for k, v in tensors.items() if v["fc1"].ndim != 2 or v["fc1"].shape[1] != 2 * hidden
           or tuple(v["fc2"].shape) != (2, v["fc1"].shape[0])]
    if len(widths) != 1 or bad:
        raise HFKanConfigError(
            f"released DyVTE routers do not fit this model (hidden size {hidden}: w1 must be (r, {2 * hidden}) and "
            f"w2 (2, r) with one r for all layers); layer(s) {bad or sorted(tensors)} disagree"
        )
    width = widths.pop()
    layers = sorted(k for k in tensors if k < num_layers - 1)
    skipped = sorted(k for k in tensors if k >= num_layers - 1)
    if skipped:
        logger.info("DyVTE: released router(s) of layer(s) %s skipped (an exit after the last layer removes nothing)",
                    skipped)
    if not layers:
        raise HFKanConfigError(f"no released DyVTE router fits a layer of this {num_layers}-layer model")
    ref = model.get_input_embeddings().weight
    routers = DyVTERouters(hidden, width, layers, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for layer in layers:
            routers.routers[str(layer)].fc1.weight.copy_(tensors[layer]["fc1"])
            routers.routers[str(layer)].fc2.weight.copy_(tensors[layer]["fc2"])
    # in place before apply, which keeps routers matching the config (replacing any others the model had)
    model.add_module(ROUTERS_ATTRIBUTE, routers)
    options = {"router_hidden": width, "layers": layers, "force_exit_layer": None}
    if threshold is not None:
        options["threshold"] = threshold
    apply(model, dyvte=options)
    return routers_of(model)


__all__ = ["RELEASED_KEY", "load_released_routers", "released_router_tensors"]
