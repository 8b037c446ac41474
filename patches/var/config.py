"""Configuration of visual attention redistribution (VAR, "See What You Are Told", ICLR 2025): ``VARConfig`` and
how ``apply(model, var=...)`` resolves (finding the sink dimensions when none are given)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ...errors import HFKanConfigError
from ..engine.options import ApplyContext, argument_options, parse_options
from .calibrate import find_sink_dims

_MODALITIES = ("image", "video")

#: Sink dimensions reported for popular base LLMs (hidden-state indices with massive activations). Examples for
#: ``VARConfig(sink_dims=...)``; ``hf_kan.patches.find_sink_dims`` finds them for any model.
KNOWN_SINK_DIMS: dict[str, tuple[int, ...]] = {
    "llama-2-7b": (2533, 1415),  # LLaVA-1.5-7B
    "llama-2-13b": (2100, 4743),  # LLaVA-1.5-13B
    "qwen2-vl-7b": (458, 2570),
}


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise HFKanConfigError(f"var.{name} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise HFKanConfigError(f"var.{name} must lie in {interval}, got {value}")
    return float(value)


def _int_tuple(name: str, value, hint: str) -> tuple[int, ...]:
    if isinstance(value, int) or not hasattr(value, "__iter__"):
        raise HFKanConfigError(f"var.{name} must be a list of ints, got {value!r}; {hint}")
    out = tuple(value)
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in out):
        raise HFKanConfigError(f"var.{name} must contain non-negative ints, got {list(out)!r}; {hint}")
    if len(set(out)) != len(out):
        raise HFKanConfigError(f"var.{name} has duplicates: {list(out)!r}")
    return out


@dataclass(frozen=True)
class VARConfig:
    """Visual attention redistribution: move attention from sink tokens to the image in image-centric heads.

    VAR acts on the rows of query positions that have at least one image before them (after the end of each sample's
    first image span, prefill and decoding alike; positions up to the end of the first image are never changed). The
    rule is causal, so cached decoding over multi-turn, multi-image conversations equals a recompute; for a
    single-image prompt the queries are the text after the image.

    Args:
        sink_dims: hidden dimensions with massive activations (``D_sink``). Found from the model's first-token hidden
            state by ``find_sink_dims`` (``apply(model, var=True)`` does it when none are given, and
            ``hf-kan calibrate-var MODEL_DIR`` stores them in a checkpoint's config); or set by hand, e.g.
            LLaMA-2-7B / LLaVA-1.5-7B ``[2533, 1415]``, LLaMA-2-13B / LLaVA-1.5-13B ``[2100, 4743]``.
        tau: a token is a sink in layer l when ``phi(x) = max_{d in sink_dims} |x_d / RMS(x)| > tau`` on the residual
            stream entering layer l.
        p: the share of their attention that sink tokens keep in a selected (head, query) row; the freed mass
            ``(1 - p) * sum_sinks alpha`` goes to the non-sink image tokens. ``p = 1`` changes nothing.
        rho: image-centric selection threshold, paper convention: a row is selected when ``r >= rho``, with ``r`` the
            share of its image attention that goes to NON-sink image tokens. The authors' released code compares
            against ``1 - rho`` instead; the two agree only at ``rho = 0.5``. Paper values: 0.8 general tasks, 0.5
            hallucination, 0.9 vision-centric.
        min_image_attention: a row is selected only when its total attention on image tokens is at least this.
        layers: decoder layers where VAR acts. ``None`` = every layer but the first two and the last (resolved by
            ``apply``, which stores the explicit list). The authors' released code also modifies the last layer, by
            accident; hf-kan leaves it unchanged by default.
        modalities: which visual tokens count as "image tokens" (``"image"``, ``"video"``).
    """

    sink_dims: tuple[int, ...]
    tau: float = 20.0
    p: float = 0.6
    rho: float = 0.8
    min_image_attention: float = 0.2
    layers: tuple[int, ...] | None = None
    modalities: tuple[str, ...] = ("image", "video")

    def __post_init__(self):
        dims = _int_tuple("sink_dims", self.sink_dims,
                          "find them with hf_kan.patches.find_sink_dims(model) or `hf-kan calibrate-var`")
        if not dims:
            raise HFKanConfigError("var.sink_dims is empty; find them with hf_kan.patches.find_sink_dims(model)")
        object.__setattr__(self, "sink_dims", dims)
        object.__setattr__(self, "tau", _number("tau", self.tau, 0.0, math.inf, lo_open=True))
        object.__setattr__(self, "p", _number("p", self.p, 0.0, 1.0))
        object.__setattr__(self, "rho", _number("rho", self.rho, 0.0, 1.0))
        object.__setattr__(self, "min_image_attention",
                           _number("min_image_attention", self.min_image_attention, 0.0, 1.0))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(_int_tuple("layers", self.layers, "e.g. [2, 3, 4]"))))
        mods = (self.modalities,) if isinstance(self.modalities, str) else tuple(self.modalities)
        if not mods or any(m not in _MODALITIES for m in mods):
            raise HFKanConfigError(f"var.modalities must be a non-empty subset of {_MODALITIES}, got {mods!r}")
        object.__setattr__(self, "modalities", mods)

    def to_dict(self) -> dict[str, Any]:
        return {"sink_dims": list(self.sink_dims), "tau": self.tau, "p": self.p, "rho": self.rho,
                "min_image_attention": self.min_image_attention,
                "layers": None if self.layers is None else list(self.layers), "modalities": list(self.modalities)}


def default_var_layers(num_layers: int) -> tuple[int, ...]:
    """Every decoder layer but the first two and the last: ``2 .. num_layers - 2``."""
    return tuple(range(2, num_layers - 1))


def resolve_var(value, current: VARConfig | None, context: ApplyContext) -> VARConfig | None:
    """Turn the ``var=`` argument of ``apply`` into a validated ``VARConfig`` with explicit layers.

    ``None`` keeps ``current``; ``True`` / a dict / a ``VARConfig`` turns VAR on. Without ``sink_dims`` they are
    taken from ``current`` or found with ``find_sink_dims(model)`` (a first-token forward).
    """
    if value is None:
        return current
    if isinstance(value, VARConfig):
        cfg = value
    else:
        value = argument_options("var", value, VARConfig)
        if "sink_dims" not in value:
            if current is not None:
                value["sink_dims"] = current.sink_dims
            else:
                value["sink_dims"] = find_sink_dims(context.model)
        cfg = parse_options("var", VARConfig, value)
    num_layers = context.num_layers
    layers = cfg.layers if cfg.layers is not None else default_var_layers(num_layers)
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise HFKanConfigError(f"var.layers {bad} do not exist: the model has {num_layers} decoder layers")
    hidden = context.hidden_size
    if hidden is not None and any(d >= hidden for d in cfg.sink_dims):
        raise HFKanConfigError(
            f"var.sink_dims {list(cfg.sink_dims)} exceed the hidden size {hidden}; were they found on another model? "
            "run hf_kan.patches.find_sink_dims(model)"
        )
    if cfg.layers != layers:
        cfg = dataclasses.replace(cfg, layers=layers)
    return cfg


__all__ = ["KNOWN_SINK_DIMS", "VARConfig", "default_var_layers", "resolve_var"]
