"""Pluggable visual-token scorers for pruning (``PruneConfig.scorer``).

A scorer says WHICH query rows vote for the visual tokens; ``base.Scorer`` turns that into scores with one small
recomputed attention (``attention_votes``), or, when the fused kernel ran the voting layer, from its rows'
log-sum-exp (``attention_tap_votes``), so no attention weights are ever requested from the main kernel. Adding a
scorer is one small file defining a ``Scorer`` subclass and one line in ``SCORERS``.
"""

from __future__ import annotations

from .base import Scorer, attention_tap_votes, attention_votes, last_prompt_row
from .fastv import FastVScorer, FastVTextMeanScorer
from .pdrop import PDropScorer

SCORERS: dict[str, type[Scorer]] = {
    FastVScorer.name: FastVScorer,
    FastVTextMeanScorer.name: FastVTextMeanScorer,
    PDropScorer.name: PDropScorer,
}

__all__ = ["SCORERS", "FastVScorer", "FastVTextMeanScorer", "PDropScorer", "Scorer", "attention_tap_votes",
           "attention_votes", "last_prompt_row"]
