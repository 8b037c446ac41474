"""PDrop / PyramidDrop (Xing et al., CVPR 2025): at each stage layer K, rank the visual tokens by the head-averaged
attention ``softmax(q_last K^T / sqrt(d))`` of the last instruction token. As released, layer K's own input norm and
query/key projections are applied to the hidden states entering K (``PruneConfig.score_layer="own"``, the default
for this scorer; ``"previous"`` reads layer K-1's attention instead, FastV's rule). As in the release, the last
instruction token is the final token of the prompt (which ends with the assistant-turn opener). The multi-stage
schedule lives in ``PruneConfig`` (``PruneConfig.preset("pdrop")``: layers 8/16/24 keeping 50/25/12.5%)."""

from __future__ import annotations

import torch

from ...engine.layout import TokenLayout
from .base import Scorer, last_prompt_row


class PDropScorer(Scorer):
    name = "pdrop"

    def query_weights(self, q: TokenLayout) -> torch.Tensor:
        return last_prompt_row(q)


__all__ = ["PDropScorer"]
