"""Efficiency accounting of one forward: tokens per layer, analytical decoder FLOPs and KV-cache bytes.

Everything is read from the forward's ``ForwardState`` (exposed as ``output.hf_kan_state``; after ``generate`` the
prefill's state is ``output.cache.hf_kan_prefill_state``), so it reflects what really ran: the rows each decoder
layer processed and the keys each layer attended (its cache, pruned or not).

FLOPs (multiply-add = 2 FLOPs) of decoder layer ``l`` for a sample with ``n`` query rows and ``s`` keys, for a
Llama/Qwen2 block with hidden ``d``, ``H`` heads and ``H_kv`` KV heads of size ``h``, MLP width ``m`` (gated, three
matrices):

    linear(n) = 2 n (d H h + 2 d H_kv h + H h d + 3 d m)        q, k, v, o projections and the MLP
    attn(n, s) = 4 n s H h                                      Q K^T and P V over all ``s`` held keys

summed over layers and samples; only real tokens count (input padding and empty rows left by pruning are excluded).
Embeddings, the LM head, norms and the vision tower are not included (they do not change with token dropping).
KV-cache bytes are the bytes of every key/value slot the cache held at the end of the forward (empty slots
included, as they are allocated; for a ``generate`` output: after its prefill):
``sum_l 2 * B * S_l * H_kv * h * bytes(dtype)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import InputLayoutError


@dataclass
class EfficiencyReport:
    """Efficiency of one forward (see the module docstring for the formulas)."""

    tokens_per_layer: list[int]
    """real query rows processed by each decoder layer, summed over the batch"""
    keys_per_layer: list[int]
    """real keys attended by each decoder layer (cache included), summed over the batch"""
    flops: float
    """analytical decoder FLOPs of this forward (the prefill FLOPs when the forward is a prefill)"""
    kv_cache_bytes: int
    """bytes of the key/value slots each layer holds after the forward (0 with ``use_cache=False``)"""
    kv_slots_per_layer: list[int] = field(default_factory=list)
    """key/value slots per layer (batch x length, empty slots included)"""

    def flops_ratio(self, baseline: EfficiencyReport) -> float:
        """``self.flops / baseline.flops`` (e.g. pruned vs unpatched)."""
        return self.flops / baseline.flops

    def as_dict(self) -> dict:
        return {"tokens_per_layer": self.tokens_per_layer, "keys_per_layer": self.keys_per_layer,
                "flops": self.flops, "kv_cache_bytes": self.kv_cache_bytes,
                "kv_slots_per_layer": self.kv_slots_per_layer}


def layer_flops(text_config, n: torch.Tensor | int, s: torch.Tensor | int) -> float:
    """FLOPs of one decoder layer for ``n`` query rows attending ``s`` keys (per sample; tensors are summed)."""
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    h = getattr(text_config, "head_dim", None) or d // heads
    m = text_config.intermediate_size
    n = torch.as_tensor(n, dtype=torch.float64)
    s = torch.as_tensor(s, dtype=torch.float64)
    linear = 2.0 * n * (d * heads * h + 2 * d * kv * h + heads * h * d + 3 * d * m)
    attn = 4.0 * n * s * heads * h
    return float((linear + attn).sum())


def _state_of(obj):
    if hasattr(obj, "layout") and hasattr(obj, "row_positions"):  # a ForwardState itself
        return obj
    state = getattr(obj, "hf_kan_state", None)
    if state is not None:
        return state
    cache = getattr(obj, "cache", None)
    if cache is None and hasattr(obj, "hf_kan_prefill_state"):
        cache = obj
    state = getattr(cache, "hf_kan_prefill_state", None)
    if state is not None:
        return state
    raise InputLayoutError(
        "efficiency_report needs the output of an hf_kan forward (output.hf_kan_state), a generate() output / "
        "HFKanCache (its prefill state), or a ForwardState; was the model patched with hf_kan.patches.apply?"
    )


def efficiency_report(model, output) -> EfficiencyReport:
    """Tokens per layer, analytical decoder FLOPs and KV-cache bytes of one forward. ``output`` is a model output of
    a patched model (``model(**inputs)``), the result of ``generate`` (reports its prefill), an ``HFKanCache`` or a
    ``ForwardState``."""
    text_config = model.config.get_text_config()
    state = _state_of(output)
    num_layers = text_config.num_hidden_layers
    lay = state.layout
    end = state.seen_before + lay.length
    tokens, keys, slots = [], [], []
    flops = 0.0
    for layer in range(num_layers):
        rows = state.row_positions(layer)
        if rows is None:
            n = lay.valid.sum(-1)
        else:
            n = lay.gather(torch.where(rows >= 0, rows - state.seen_before, -1)).valid.sum(-1)
        if state.cache is not None:
            # the cache as it was at the end of this forward (later decode steps only appended positions >= end)
            ledger = state.cache.ledger
            held = ledger.key_positions(layer) if layer < len(ledger.held) else None
            if held is None:
                s = ledger.tokens.valid[:, :end].sum(-1)
                width = end
            else:
                before = held < end
                s = (ledger.tokens.gather(held).valid & before).sum(-1)
                width = int(before.sum(-1).max())
            slots.append(int(lay.batch_size * width))
        else:
            s = n
        tokens.append(int(n.sum()))
        keys.append(int(s.sum()))
        flops += layer_flops(text_config, n.cpu(), s.cpu())
    kv_bytes = 0
    if state.cache is not None:
        kv = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        h = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        elem = torch.empty((), dtype=model.dtype).element_size()
        kv_bytes = int(sum(2 * sl * kv * h * elem for sl in slots))
    return EfficiencyReport(tokens, keys, flops, kv_bytes, slots)


__all__ = ["EfficiencyReport", "efficiency_report", "layer_flops"]
