"""Configuration of visual-token pruning (FastV / PDrop criteria, attention debiasing): ``PruneConfig``.

Stored as the ``prune`` entry of the ``hf_kan`` config section (see ``engine/config.py``), so ``save_pretrained`` /
``from_pretrained`` restore it, including the positional trend fitted by ``hf_kan.patches.calibrate_trend``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ...errors import HFKanConfigError
from ..engine.options import ApplyContext, argument_options
from .scorers import SCORERS

#: ``method`` presets: the stage layers, keep ratios and scoring layer of the papers' released code.
METHODS: dict[str, dict[str, Any]] = {
    "fastv": {"layers": (2,), "keep_ratios": (0.5,), "scorer": "fastv", "score_layer": "previous"},
    "pdrop": {"layers": (8, 16, 24), "keep_ratios": (0.5, 0.25, 0.125), "scorer": "pdrop", "score_layer": "own"},
}
#: ``score_layer`` values: where a stage at layer K reads its attention scores
SCORE_LAYERS = ("own", "previous")
#: keys of the ``debias`` dict form (``debias={"multiplier_b": 0.003}``) and the fields they set
DEBIAS_KEYS = {"trend": "trend", "multiplier_b": "multiplier_b", "padding_threshold": "padding_threshold",
               "stages": "debias_stages"}


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


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class PruneConfig:
    """Attention-based visual-token pruning: drop low-scoring visual tokens from the hidden states and the KV cache of
    every layer from ``layers[s]`` on.

    Args:
        layers: the layer K of each stage; its low-scoring visual tokens are dropped before layer K runs (FastV:
            ``(2,)``; PDrop: ``(8, 16, 24)``). Strictly increasing, >= 1 (layer 0 keeps every token).
        keep_ratios: per stage, the fraction of each sample's ORIGINAL visual tokens kept from that layer on (FastV:
            ``(0.5,)``; PDrop: ``(0.5, 0.25, 0.125)``); in ``(0, 1]``, non-increasing. A sample with ``N`` visual
            tokens keeps ``floor(ratio * N + 0.5)`` of them.
        scorer: name of the scoring rule in ``hf_kan.patches.prune.scorers.SCORERS`` (``"fastv"``: last prompt token;
            ``"fastv_text_mean"``: mean over the prompt's text tokens; ``"pdrop"``: last instruction token).
        score_layer: which attention ranks the tokens of the stage at layer K. ``"own"``: layer K's own input norm,
            query and key projections (and RoPE at the tokens' original positions) applied to the hidden states
            ENTERING layer K, one query row per voter (PyramidDrop's release); ``"previous"``: the attention of layer
            K-1, read in that layer's attention call (FastV's rule). ``None`` (default) picks ``"own"`` for the
            ``"pdrop"`` scorer and ``"previous"`` otherwise; the resolved value is stored.
        debias: apply attention debiasing (positional trend + padding suppression) at the ``debias_stages``. A dict
            turns it on and sets the debiasing options at once: ``{"trend": b}`` or ``{"multiplier_b": b}``, plus
            ``"padding_threshold"`` and ``"stages"`` (= ``debias_stages``).
        trend: the FITTED positional trend: ``b`` of ``T(i) = exp(-b * i)``, the shape of the attention scores over a
            token's index ``i`` in its sample's visual sequence; scores are DIVIDED by ``T(i)``. This is what
            ``hf_kan.patches.calibrate_trend`` / ``hf-kan calibrate-prune`` fit and store. Attention grows toward
            later tokens (recency), so a fitted ``b`` is NEGATIVE; 0 = no correction.
        multiplier_b: the same correction in the form the debiasing paper quotes its ``b`` (about 0.001-0.005 over
            576 tokens): scores are MULTIPLIED by ``exp(-multiplier_b * i)``, so a POSITIVE value down-weights later
            tokens. ``multiplier_b = m`` is ``trend = -m``; set one of the two (``None`` = use ``trend``). Copying the
            paper's value into ``trend`` would invert the correction.
        padding_threshold: a visual token whose patch covers more than this fraction of image-processor padding
            (LLaVA's expand-to-square) gets score 0, and the keep count is capped at the number of real tokens.
            The fraction is computed from the ORIGINAL image sizes when they are known
            (``hf_kan.patches.padding_cache(model, images=...)``), else from the pixels.
        debias_stages: indices of the stages where debiasing applies (default: the first).
        method: the preset these values came from (``"fastv"``, ``"pdrop"``) or ``"custom"``; informational.
    """

    layers: tuple[int, ...] = (2,)
    keep_ratios: tuple[float, ...] = (0.5,)
    scorer: str = "fastv"
    score_layer: str | None = None
    debias: bool = False
    trend: float = 0.0
    multiplier_b: float | None = None
    padding_threshold: float = 0.5
    debias_stages: tuple[int, ...] = (0,)
    method: str = "custom"

    def __post_init__(self):
        if isinstance(self.debias, dict):
            self._expand_debias(self.debias)
        layers = _tuple(self.layers, "layers", int)
        ratios = tuple(float(r) for r in _tuple(self.keep_ratios, "keep_ratios", (int, float)))
        if any(k < 1 for k in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise HFKanConfigError(
                f"prune.layers must be strictly increasing layer indices >= 1 (layer 0 keeps every token), got "
                f"{list(layers)}"
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
        score_layer = self.score_layer
        if score_layer is None:
            score_layer = "own" if self.scorer == "pdrop" else "previous"
        if score_layer not in SCORE_LAYERS:
            raise HFKanConfigError(
                f"prune.score_layer must be one of {list(SCORE_LAYERS)} ('own': layer K's own query/key projections "
                f"on the hidden states entering K, as PyramidDrop releases it; 'previous': layer K-1's attention, "
                f"FastV's rule), got {score_layer!r}"
            )
        if not isinstance(self.debias, bool):
            raise HFKanConfigError(f"prune.debias must be true, false or a dict of debiasing options, got "
                                   f"{self.debias!r}")
        if not _finite(self.trend):
            raise HFKanConfigError(f"prune.trend (fitted b of T(i) = exp(-b i)) must be a finite number, got "
                                   f"{self.trend!r}")
        if self.multiplier_b is not None:
            if not _finite(self.multiplier_b):
                raise HFKanConfigError(f"prune.multiplier_b (scores x exp(-b i)) must be a finite number or null, "
                                       f"got {self.multiplier_b!r}")
            if self.trend != 0.0:
                raise HFKanConfigError(
                    f"prune.trend={self.trend} and prune.multiplier_b={self.multiplier_b} both set the positional "
                    "correction (multiplier_b = m means trend = -m); give only one: trend for a value fitted by "
                    "calibrate_trend, multiplier_b for the paper's positive b"
                )
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
        object.__setattr__(self, "score_layer", score_layer)
        object.__setattr__(self, "trend", float(self.trend))
        if self.multiplier_b is not None:
            object.__setattr__(self, "multiplier_b", float(self.multiplier_b))
        object.__setattr__(self, "padding_threshold", float(thr))
        object.__setattr__(self, "debias_stages", stages)

    def _expand_debias(self, options: dict) -> None:
        """``debias={...}``: debiasing on, with the options given (each may be given only once)."""
        unknown = sorted(set(options) - set(DEBIAS_KEYS))
        if unknown:
            raise HFKanConfigError(f"unknown debias option(s) {unknown}; valid: {sorted(DEBIAS_KEYS)}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in options.items():
            name = DEBIAS_KEYS[key]
            if getattr(self, name) != defaults[name]:
                raise HFKanConfigError(f"prune.{name} is given twice: as debias[{key!r}] and as prune.{name}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "debias", True)

    @property
    def correction_b(self) -> float:
        """``b`` of the trend the scores are divided by, ``T(i) = exp(-b i)``: ``trend``, or ``-multiplier_b``."""
        return -self.multiplier_b if self.multiplier_b is not None else self.trend

    @classmethod
    def preset(cls, method: str, **overrides) -> PruneConfig:
        """The ``"fastv"`` or ``"pdrop"`` defaults, with ``overrides`` applied."""
        if method not in METHODS:
            raise HFKanConfigError(f"unknown pruning method {method!r}; presets: {sorted(METHODS)}")
        return cls(**{**METHODS[method], "method": method, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers), "keep_ratios": list(self.keep_ratios), "scorer": self.scorer,
            "score_layer": self.score_layer, "debias": self.debias, "trend": self.trend,
            "multiplier_b": self.multiplier_b, "padding_threshold": self.padding_threshold,
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


__all__ = ["METHODS", "SCORE_LAYERS", "PruneConfig", "resolve_prune"]
