"""Configuration of visual-token pruning (FastV / PDrop criteria, attention debiasing): ``PruneConfig``.

Stored as the ``prune`` entry of the ``hf_kan`` config section (see ``engine/config.py``), so ``save_pretrained`` /
``from_pretrained`` restore it, including the positional trend fitted by ``hf_kan.patches.calibrate_trend``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...errors import HFKanConfigError
from ..engine.options import ApplyContext, argument_options
from .scorers import SCORERS

#: ``method`` presets: the stage layers and keep ratios of the papers' default settings.
METHODS: dict[str, dict[str, Any]] = {
    "fastv": {"layers": (2,), "keep_ratios": (0.5,), "scorer": "fastv"},
    "pdrop": {"layers": (8, 16, 24), "keep_ratios": (0.5, 0.25, 0.125), "scorer": "pdrop"},
}


def _tuple(value, name: str, kind) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise HFKanConfigError(f"prune.{name} must be a list of numbers, got {value!r}") from None
    if not out or any(isinstance(v, bool) or not isinstance(v, kind) for v in out):
        raise HFKanConfigError(f"prune.{name} must be a non-empty list of numbers of type {kind}, got {value!r}")
    return out


@dataclass(frozen=True)
class PruneConfig:
    """Attention-based visual-token pruning: drop low-scoring visual tokens from the hidden states and the KV cache of
    every layer from ``layers[s]`` on.

    Args:
        layers: the layer K of each stage; its visual tokens are scored with layer K-1's attention and the low scorers
            are dropped before layer K runs (FastV: ``(2,)``; PDrop: ``(8, 16, 24)``). Strictly increasing, >= 1.
        keep_ratios: per stage, the fraction of each sample's ORIGINAL visual tokens kept from that layer on (FastV:
            ``(0.5,)``; PDrop: ``(0.5, 0.25, 0.125)``); in ``(0, 1]``, non-increasing. A sample with ``N`` visual
            tokens keeps ``floor(ratio * N + 0.5)`` of them.
        scorer: name of the scoring rule in ``hf_kan.patches.prune.scorers.SCORERS`` (``"fastv"``: last prompt token;
            ``"fastv_text_mean"``: mean over the prompt's text tokens; ``"pdrop"``: last instruction token).
        debias: apply attention debiasing (positional trend + padding suppression) at the ``debias_stages``.
        trend: ``b`` of the positional trend ``T(i) = exp(-b * i)`` over a token's index ``i`` in its sample's visual
            sequence; scores are divided by ``T(i)``. Fit it once per model with ``hf_kan.patches.calibrate_trend``
            (negative when attention grows toward later tokens, the usual recency bias; 0 = no correction).
        padding_threshold: a visual token whose patch covers more than this fraction of image-processor padding
            (LLaVA's expand-to-square) gets score 0, and the keep count is capped at the number of real tokens.
        debias_stages: indices of the stages where debiasing applies (default: the first).
        method: the preset these values came from (``"fastv"``, ``"pdrop"``) or ``"custom"``; informational.
    """

    layers: tuple[int, ...] = (2,)
    keep_ratios: tuple[float, ...] = (0.5,)
    scorer: str = "fastv"
    debias: bool = False
    trend: float = 0.0
    padding_threshold: float = 0.5
    debias_stages: tuple[int, ...] = (0,)
    method: str = "custom"

    def __post_init__(self):
        layers = _tuple(self.layers, "layers", int)
        ratios = tuple(float(r) for r in _tuple(self.keep_ratios, "keep_ratios", (int, float)))
        if any(k < 1 for k in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise HFKanConfigError(
                f"prune.layers must be strictly increasing layer indices >= 1 (layer K is scored with layer K-1's "
                f"attention), got {list(layers)}"
            )
        if len(ratios) != len(layers):
            raise HFKanConfigError(
                f"prune.keep_ratios needs one ratio per stage: {len(layers)} layer(s) {list(layers)} but "
                f"{len(ratios)} ratio(s) {list(ratios)}"
            )
        if any(not (0.0 < r <= 1.0) for r in ratios) or any(b > a for a, b in zip(ratios, ratios[1:])):
            raise HFKanConfigError(f"prune.keep_ratios must be in (0, 1] and non-increasing, got {list(ratios)}")
        if self.scorer not in SCORERS:
            raise HFKanConfigError(f"prune.scorer {self.scorer!r} is unknown; available: {sorted(SCORERS)}")
        if not isinstance(self.debias, bool):
            raise HFKanConfigError(f"prune.debias must be true or false, got {self.debias!r}")
        if isinstance(self.trend, bool) or not isinstance(self.trend, (int, float)) or not math.isfinite(self.trend):
            raise HFKanConfigError(f"prune.trend (b of exp(-b i)) must be a finite number, got {self.trend!r}")
        thr = self.padding_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not (0.0 <= thr < 1.0):
            raise HFKanConfigError(f"prune.padding_threshold must be in [0, 1), got {thr!r}")
        stages = tuple(self.debias_stages) if not isinstance(self.debias_stages, int) else (self.debias_stages,)
        if any(isinstance(s, bool) or not isinstance(s, int) or not (0 <= s < len(layers)) for s in stages):
            raise HFKanConfigError(
                f"prune.debias_stages must be stage indices in [0, {len(layers) - 1}], got {list(stages)}"
            )
        if self.method not in (*METHODS, "custom"):
            raise HFKanConfigError(f"prune.method must be one of {[*METHODS, 'custom']}, got {self.method!r}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep_ratios", ratios)
        object.__setattr__(self, "trend", float(self.trend))
        object.__setattr__(self, "padding_threshold", float(thr))
        object.__setattr__(self, "debias_stages", stages)

    @classmethod
    def preset(cls, method: str, **overrides) -> PruneConfig:
        """The ``"fastv"`` or ``"pdrop"`` defaults, with ``overrides`` applied."""
        if method not in METHODS:
            raise HFKanConfigError(f"unknown pruning method {method!r}; presets: {sorted(METHODS)}")
        return cls(**{**METHODS[method], "method": method, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers), "keep_ratios": list(self.keep_ratios), "scorer": self.scorer,
            "debias": self.debias, "trend": self.trend, "padding_threshold": self.padding_threshold,
            "debias_stages": list(self.debias_stages), "method": self.method,
        }


def resolve_prune(value, current: PruneConfig | None, context: ApplyContext) -> PruneConfig | None:
    """``apply(model, prune=...)``: ``None`` keeps ``current``, ``True`` / ``"fastv"`` / ``"pdrop"`` use a preset, a
    dict gives options (``{"method": "pdrop", ...}`` starts from a preset); the layers must exist in the model."""
    num_layers = context.num_layers
    if value is None:
        cfg = current
    elif isinstance(value, PruneConfig):
        cfg = value
    elif value is True or isinstance(value, str):
        cfg = PruneConfig.preset("fastv" if value is True else value)
    else:
        opts = argument_options("prune", value, PruneConfig, extra_forms="'fastv', 'pdrop', ")
        method = opts.pop("method", None)
        cfg = PruneConfig.preset(method, **opts) if method and method != "custom" else PruneConfig(**opts)
    if cfg is not None and cfg.layers[-1] >= num_layers:
        raise HFKanConfigError(
            f"prune.layers {list(cfg.layers)} reach beyond this model's {num_layers} decoder layers; pick layers < "
            f"{num_layers} (e.g. prune={{'method': 'pdrop', 'layers': [...]}})"
        )
    return cfg


__all__ = ["METHODS", "PruneConfig", "resolve_prune"]
