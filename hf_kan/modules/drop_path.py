"""Stochastic depth ("drop path", Huang et al., "Deep Networks with Stochastic Depth", arXiv 1603.09382)."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``drop_prob`` in training.

    In training, ``x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` drawn once per sample (broadcast over the other
    dimensions), so the expectation is ``x``; in eval mode, or with ``p = 0``, the identity.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.dim() - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep)
        return hidden_states * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


__all__ = ["DropPath"]
