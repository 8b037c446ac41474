"""FastV ("An Image is Worth 1/2 Tokens After Layer 2", Chen et al., ECCV 2024): a visual token's importance is the
head-averaged attention that the LAST prompt token pays to it in layer K-1.

``FastVTextMeanScorer`` is the variant that averages over the prompt's text tokens after the first visual token (the
instruction and the assistant-turn opener; text before the image cannot see it and would only add zeros)."""

from __future__ import annotations

import torch

from ...engine.layout import TEXT, TokenLayout
from .base import Scorer, last_prompt_row


class FastVScorer(Scorer):
    name = "fastv"

    def query_weights(self, q: TokenLayout) -> torch.Tensor:
        return last_prompt_row(q)


class FastVTextMeanScorer(Scorer):
    name = "fastv_text_mean"

    def query_weights(self, q: TokenLayout) -> torch.Tensor:
        vis_pos = torch.where(q.visual, q.position, torch.iinfo(torch.long).max)
        first_visual = vis_pos.min(-1, keepdim=True).values
        voters = (q.modality == TEXT) & (q.position > first_visual)
        # a sample without text after its image falls back to its last prompt token
        voters = torch.where(voters.any(-1, keepdim=True), voters, last_prompt_row(q).bool())
        w = voters.float()
        return w / w.sum(-1, keepdim=True)


__all__ = ["FastVScorer", "FastVTextMeanScorer"]
