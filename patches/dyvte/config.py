"""Configuration of dynamic visual-token exit (DyVTE, arXiv 2411.19628): ``DyVTEConfig``.

Stored as the ``dyvte`` entry of the ``hf_kan`` config section (see ``engine/config.py``); the routers' weights are
model parameters (``routers.py``), saved by ``save_pretrained`` next to the model's own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ...errors import HFKanConfigError
from ..engine.options import ApplyContext, argument_options

#: the authors' router width (LLaVA-1.5 7B/13B)
PAPER_ROUTER_HIDDEN = 2048


def _int_or_none(value, name: str, low: int = 0):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise HFKanConfigError(f"dyvte.{name} must be an integer >= {low} or null, got {value!r}")
    return value


@dataclass(frozen=True)
class DyVTEConfig:
    """Dynamic visual-token exit: after decoder layer ``l`` a router reads ``[mean hidden state of the text after the
    image, excluding the last prompt token ; hidden state of the last prompt token]`` (the authors' features) and, at
    the first layer where ``p(exit) > threshold``, every visual token leaves the hidden states and the caches of all
    later layers (text keeps its original positions). Routers trained with the authors' code load with
    ``hf_kan.patches.load_released_routers``.

    Args:
        threshold: exit when the router's ``p(exit)`` is strictly above it (0.5 reproduces the paper). In ``(0, 1)``.
            Untrained routers output ``p(exit) = 0.5`` exactly (their last layer starts at zero), so they never exit.
        router_hidden: width of each router's hidden layer (``Linear(2h, router_hidden) -> GELU ->
            Linear(router_hidden, 2)``, no biases). ``None``: ``min(2048, 2h)`` resolved when applied (2048 is
            the authors' value for LLaVA-1.5).
        layers: the decoder layers after which a router runs (``None``: every layer but the last, resolved when
            applied). An exit after layer ``l`` removes the visual tokens from layer ``l + 1`` on, so the last layer
            cannot exit.
        force_exit_layer: ignore the routers and exit after this layer in every sample with visual tokens (analysis
            and label making; must be one of ``layers``). ``None`` (default) uses the routers.
    """

    threshold: float = 0.5
    router_hidden: int | None = None
    layers: tuple[int, ...] | None = None
    force_exit_layer: int | None = None

    def __post_init__(self):
        thr = self.threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr) or not 0 < thr < 1:
            raise HFKanConfigError(f"dyvte.threshold must be a probability in (0, 1), got {thr!r}")
        _int_or_none(self.router_hidden, "router_hidden", 1)
        layers = self.layers
        if layers is not None:
            if isinstance(layers, int):
                layers = (layers,)
            try:
                layers = tuple(layers)
            except TypeError:
                raise HFKanConfigError(f"dyvte.layers must be a list of layer indices, got {layers!r}") from None
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise HFKanConfigError(f"dyvte.layers must be a non-empty list of layer indices >= 0, got {layers!r}")
            if len(set(layers)) != len(layers):
                raise HFKanConfigError(f"dyvte.layers has duplicates: {list(layers)}")
            layers = tuple(sorted(layers))
        force = _int_or_none(self.force_exit_layer, "force_exit_layer")
        if force is not None and layers is not None and force not in layers:
            raise HFKanConfigError(f"dyvte.force_exit_layer {force} is not one of dyvte.layers {list(layers)}")
        object.__setattr__(self, "threshold", float(thr))
        object.__setattr__(self, "layers", layers)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "router_hidden": self.router_hidden,
                "layers": None if self.layers is None else list(self.layers),
                "force_exit_layer": self.force_exit_layer}


def resolve_dyvte(value, current: DyVTEConfig | None, context: ApplyContext) -> DyVTEConfig | None:
    """``apply(model, dyvte=...)``: ``None`` keeps ``current``, ``True`` uses the defaults, a dict gives options
    (missing ones taken from ``current``), a ``DyVTEConfig`` is used as is. ``layers`` and ``router_hidden`` are made
    explicit for this model, so the saved config says which routers exist."""
    num_layers, hidden_size = context.num_layers, context.hidden_size
    if value is None:
        cfg = current
    elif isinstance(value, DyVTEConfig):
        cfg = value
    else:
        opts = argument_options("dyvte", value, DyVTEConfig)
        if current is not None:
            inherited = {**current.to_dict(), "force_exit_layer": None}  # a forced exit is never inherited silently
            opts = {**inherited, **opts}
        cfg = DyVTEConfig(**opts)
    if cfg is None:
        return None
    if num_layers < 2:
        raise HFKanConfigError(f"DyVTE needs at least 2 decoder layers (exit after one, skip the rest); got "
                               f"{num_layers}")
    layers = cfg.layers if cfg.layers is not None else tuple(range(num_layers - 1))
    bad = [i for i in layers if i >= num_layers - 1]
    if bad:
        raise HFKanConfigError(
            f"dyvte.layers {bad} cannot exit: an exit after layer l removes visual tokens from layer l + 1 on, and "
            f"this model has {num_layers} decoder layers (valid: 0..{num_layers - 2})"
        )
    if cfg.force_exit_layer is not None and cfg.force_exit_layer not in layers:
        raise HFKanConfigError(f"dyvte.force_exit_layer {cfg.force_exit_layer} is not one of dyvte.layers "
                               f"{list(layers)}")
    width = cfg.router_hidden if cfg.router_hidden is not None else min(PAPER_ROUTER_HIDDEN, 2 * hidden_size)
    return dataclasses.replace(cfg, layers=tuple(layers), router_hidden=width)


__all__ = ["PAPER_ROUTER_HIDDEN", "DyVTEConfig", "resolve_dyvte"]
