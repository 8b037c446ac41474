"""The MoH tuner layer: wraps an attention output projection and gates each head's output before it.

MoH(x) = sum_i g_i H_i W_O^i = W_O [g_1 H_1; ...; g_H H_H]: the wrapped projection receives the concatenated head
outputs [..., H * D]; the layer scales head i of each token by its gate g_i and calls the original projection.
The gates are computed by a forward hook on the sibling query projection (``q_proj``) of the same attention block,
from its input (the token representation x) and output (the per-head queries), so they are known before attention
runs; the next output-projection call consumes them. The attention code itself is untouched and every attention
implementation (eager, sdpa, flash, hf_kan) and grouped-query attention keep working; with ``skip_inactive_heads``
the attention call also reads the pending gates to skip inactive heads (``hf_kan.moh.skip``).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import HFKanConfigError, InputLayoutError
from .config import MoHConfig
from .router import LearnedHeadRouter, QueryNormHeadRouter


def raise_not_mergeable() -> None:
    """MoH has no weight delta to merge: its gates are computed per token at run time."""
    raise HFKanConfigError(
        "MoH gates depend on each token, so they cannot be merged into the weights; use unload() to drop MoH."
    )


class MoHLayer(BaseTunerLayer):
    """PEFT tuner-layer mixin holding one head router per adapter (``moh_router[adapter_name]``)."""

    adapter_layer_names = ("moh_router",)
    other_param_names = ("moh_head_split", "moh_skip_inactive_heads")

    def __init__(self, base_layer: nn.Module, num_heads: int, head_dim: int, hidden_size: int, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.hidden_size = hidden_size
        self.moh_router = nn.ModuleDict({})
        self.moh_head_split: dict[str, tuple[int, int]] = {}
        self.moh_skip_inactive_heads: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Per-forward state (never saved): the gates the query hook computed (consumed by the output projection;
        # None when no adapter is active), and the last load-balance losses.
        self._moh_gates: torch.Tensor | None = None
        self._moh_aux: dict[str, torch.Tensor] = {}
        self._moh_query_hook: torch.utils.hooks.RemovableHandle | None = None
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: MoHConfig, **kwargs: Any) -> None:
        """Create the router of ``adapter_name`` for this attention block."""
        shared, top_k = config.head_split(self.num_heads)
        if config.router == "learned":
            init_std = config.router_init_std_for(self.hidden_size)
            router = LearnedHeadRouter(self.hidden_size, self.num_heads, shared, top_k, init_std)
        else:
            router = QueryNormHeadRouter(self.num_heads, shared, top_k)
        self.moh_router[adapter_name] = router
        self.moh_head_split[adapter_name] = (shared, top_k)
        self.moh_skip_inactive_heads[adapter_name] = config.skip_inactive_heads
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def attach_query_hook(self, query_module: nn.Module) -> None:
        """Compute the gates from ``query_module``'s input and output on every forward; replaces an earlier hook."""
        self.detach_query_hook()
        self._moh_query_hook = query_module.register_forward_hook(self._route, with_kwargs=True)

    def detach_query_hook(self) -> None:
        """Remove the hook on the query projection (on unload / delete)."""
        if self._moh_query_hook is not None:
            self._moh_query_hook.remove()
            self._moh_query_hook = None
        self._moh_gates = None

    def _active_moh_adapters(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [name for name in self.active_adapters if name in self.moh_router]

    def _route(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        active = self._active_moh_adapters()
        if not active:
            self._moh_gates = None
            return
        hidden = args[0] if args else next(iter(kwargs.values()))
        if output.shape[-1] != self.num_heads * self.head_dim:
            raise InputLayoutError(
                f"MoH expected queries of shape [..., {self.num_heads * self.head_dim}], got {tuple(output.shape)}; "
                "the query module must output all heads' queries, head-major."
            )
        num_tokens = output.shape[:-1].numel()
        hidden, query = hidden.reshape(num_tokens, -1), output.reshape(num_tokens, -1)
        gates = None
        for name in active:
            g, aux = self.moh_router[name](hidden, query)
            if aux is not None and self.training:
                self._moh_aux[name] = aux
            gates = g if gates is None else gates * g
        self._moh_gates = gates

    def pending_gates(self) -> torch.Tensor | None:
        """The gates [N, H] the query hook computed for the attention call in progress (not consumed), or None."""
        return self._moh_gates

    def skips_inactive_heads(self) -> bool:
        """Whether every active adapter asks for skipping inactive heads (``MoHConfig.skip_inactive_heads``)."""
        active = self._active_moh_adapters()
        return bool(active) and all(self.moh_skip_inactive_heads.get(name, False) for name in active)

    def head_gates(self, num_tokens: int) -> torch.Tensor | None:
        """Gates [num_tokens, H] of the active adapters (product if several), computed by the query hook.

        Consumes them (in training the query hook also recorded each adapter's load-balance loss). Returns None when
        no MoH adapter is active.
        """
        gates, self._moh_gates = self._moh_gates, None
        if not self._active_moh_adapters():
            return None
        if gates is None:
            raise InputLayoutError(
                "MoH found no query-projection output for this attention call. The MoH layer wraps the output "
                "projection and reads the queries from the sibling module named by MoHConfig.query_module; make sure "
                "that module runs in the same attention forward (or set query_module to the right name)."
            )
        if gates.shape[0] != num_tokens:
            raise InputLayoutError(
                f"MoH routed {gates.shape[0]} tokens in the query projection but the output projection got "
                f"{num_tokens}; the query module must run on the same tokens as the attention block."
            )
        return gates

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise_not_mergeable()

    def unmerge(self) -> None:
        """Nothing to undo: MoH is never merged."""

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Used by PEFT's unload(): drop the hook and return the wrapped module (a LoRA layer stays in place)."""
        if merge:
            self.merge(safe_merge, adapter_names)
        self.detach_query_hook()
        return self.base_layer

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._moh_aux.pop(adapter_name, None)


class MoHLinear(nn.Module, MoHLayer):
    """An output projection with Mixture-of-Head gating of its input heads."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MoHConfig,
        num_heads: int,
        head_dim: int,
        hidden_size: int,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        MoHLayer.__init__(self, base_layer, num_heads, head_dim, hidden_size, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """W_O applied to the gated heads: base_layer(concat_i g_i H_i); exactly base_layer(x) when disabled."""
        lead = x.shape[:-1]
        gates = self.head_gates(lead.numel())
        if gates is None:
            return self.base_layer(x, *args, **kwargs)
        heads = x.reshape(*lead, self.num_heads, self.head_dim)
        gated = heads * gates.view(*lead, self.num_heads, 1).to(x.dtype)
        return self.base_layer(gated.reshape(x.shape), *args, **kwargs)

    def __repr__(self) -> str:
        return "moh." + super().__repr__()


__all__ = ["MoHLayer", "MoHLinear", "raise_not_mergeable"]
