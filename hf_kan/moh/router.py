"""The two MoH routers: per-token head gates g in R^H from the token representation x or the per-head queries.

Both return gates of shape [N, H] (N tokens) whose first ``num_shared`` columns belong to the shared heads, and an
optional load-balance loss. Reference: Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head Attention",
arXiv 2410.11842, Sec. 3 (two-stage routing, load balance) and Sec. 4.4 / App. (continue-tuning router).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype router scores are computed in: float32, or the model's dtype when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Return a 0/1 tensor shaped like ``scores`` [N, E] with ones at the ``k`` largest scores of each row."""
    mask = torch.zeros_like(scores)
    if k > 0:
        mask.scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
    return mask


def load_balance_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_b = E * sum_i f_i P_i over the E routed heads.

    f_i = mean over tokens of ``mask[:, i]`` (fraction of tokens routed to head i, no gradient), P_i = mean over tokens
    of ``probs[:, i]`` (mean router probability). ``probs``, ``mask``: [N, E].
    """
    num_routed = probs.shape[-1]
    dtype = routing_dtype(probs.dtype)
    f = mask.detach().to(dtype).mean(dim=0)
    p = probs.to(dtype).mean(dim=0)
    return num_routed * (f * p).sum()


class LearnedHeadRouter(nn.Module):
    """Two-stage MoH router: shared heads weighted by alpha1 * softmax(W_s x), top-k routed heads by
    alpha2 * softmax(W_r x) renormalised over the top-k, with [alpha1, alpha2] = softmax(W_h x).

    Following the authors' code, the routed gates are renormalised over the selected heads and multiplied by k,
    the shared gates multiplied by h_s and the alphas by 2, so every gate starts near 1 and the model starts at plain
    multi-head-attention scale. Init: W_r ~ N(0, init_std^2) (random, so tokens route differently from step 0; top-k
    does not depend on the scale), W_s = W_h = 0 (shared gates and alphas start at exactly 1); ``init_std=0`` makes
    every gate exactly 1. Logits are computed in float32, or in the model's dtype when it is wider.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_shared: int, top_k: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.num_shared, self.top_k = num_heads, num_shared, top_k
        self.num_routed = num_heads - num_shared
        self.num_mix = 2 if num_shared > 0 and self.num_routed > 0 else 0
        # One projection for the three routers (one matmul per forward); rows: [W_r (E) | W_s (h_s) | W_h (2)].
        self.proj = nn.Linear(hidden_size, self.num_routed + num_shared + self.num_mix, bias=False)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        if self.init_std > 0:
            with torch.no_grad():
                nn.init.normal_(self.proj.weight[: self.num_routed], std=self.init_std)

    def forward(self, x: torch.Tensor, query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [N, hidden] token representations. Returns gates [N, H] and L_b (None in eval or without routed heads)."""
        dtype = routing_dtype(self.proj.weight.dtype)
        logits = F.linear(x.to(dtype), self.proj.weight.to(dtype))
        routed_logits, shared_logits, mix_logits = logits.split([self.num_routed, self.num_shared, self.num_mix], -1)
        parts, aux = [], None
        alpha = 2.0 * F.softmax(mix_logits, dim=-1) if self.num_mix else None
        if self.num_shared:
            g_shared = self.num_shared * F.softmax(shared_logits, dim=-1)
            parts.append(g_shared * alpha[:, :1] if alpha is not None else g_shared)
        if self.num_routed:
            probs = F.softmax(routed_logits, dim=-1)
            mask = topk_mask(probs.detach(), self.top_k)
            kept = probs * mask
            g_routed = self.top_k * kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps)
            parts.append(g_routed * alpha[:, 1:] if alpha is not None else g_routed)
            if self.training:  # the loss is only needed (and only recorded) in training
                aux = load_balance_loss(probs, mask)
        return torch.cat(parts, dim=-1), aux


class QueryNormHeadRouter(nn.Module):
    """Parameter-free continue-tuning router (MoH-LLaMA3): the first ``num_shared`` heads are always on; the routed
    heads are scored by the L2 norm of their query vector, s_i = ||q_i|| / std_j(||q_j||), and the top-k get gate 1,
    the rest 0. In training the binary gates use a straight-through estimator: forward value mask, gradient of
    p = softmax(s) over the routed heads (g = mask + (p - stopgrad(p))), so routing gradients reach the queries.
    """

    def __init__(self, num_heads: int, num_shared: int, top_k: int) -> None:
        super().__init__()
        self.num_heads, self.num_shared, self.top_k = num_heads, num_shared, top_k

    def forward(self, x: torch.Tensor | None, query: torch.Tensor) -> tuple[torch.Tensor, None]:
        """query: [N, H * D] per-token queries (head-major). Returns gates [N, H] and None (no auxiliary loss)."""
        n = query.shape[0]
        dtype = routing_dtype(query.dtype)
        ones = query.new_ones(n, self.num_shared, dtype=dtype)
        num_routed = self.num_heads - self.num_shared
        if num_routed == 0:
            return ones, None
        heads = query.view(n, self.num_heads, -1)[:, self.num_shared :].to(dtype)
        norms = heads.norm(dim=-1)  # [N, E]
        if num_routed > 1:
            norms = norms / norms.std(dim=-1, keepdim=True).clamp_min(torch.finfo(norms.dtype).eps)
        mask = topk_mask(norms.detach(), self.top_k)
        if torch.is_grad_enabled() and query.requires_grad:
            probs = F.softmax(norms, dim=-1)
            mask = mask + (probs - probs.detach())  # exactly 0/1 forward
        return torch.cat([ones, mask], dim=-1), None


__all__ = ["LearnedHeadRouter", "QueryNormHeadRouter", "load_balance_loss", "routing_dtype", "topk_mask"]
