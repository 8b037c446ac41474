"""Skipping the attention work of inactive heads: MoH inference that computes only what the router keeps.

MoH zeroes inactive heads before ``o_proj``, so their attention output is never used. This module computes attention
only where some query of a head is active, and returns zeros elsewhere; inactive heads are multiplied by a zero gate
either way, so the gated output projection sees the input of the dense gated computation: bitwise for decoding
without GQA (the same SDPA kernel on views of the same tensors), up to float rounding otherwise (other call splits,
GQA queries packed per key/value head).

How the attention call learns the gates. The MoH query hook computes the gates from ``q_proj`` before attention
runs (``MoHLayer.pending_gates``). Transformers' attention blocks look their attention function up by
``self.config._attn_implementation``; ``install_head_skipping`` gives each wrapped attention block a thin view of its
config (``MoHAttentionConfig``) whose ``_attn_implementation`` reads ``"hf_kan_moh"`` (registered with
``AttentionInterface``) while the model's real implementation is ``sdpa`` or ``hf_kan``, and the real name otherwise.
Everything else reads through to the shared config, so ``set_attn_implementation``, mask building, the
``hf_kan.patches`` hooks and saving see the unchanged config; ``MoHModel.unload`` restores the plain config.
``moh_attention`` then either runs the skipping path or calls the real implementation unchanged (the dense gated
path), which it does for: training / gates that need gradients (the straight-through estimator needs every head's
output), non-CPU tensors (not measured there: no GPU was available; a GPU wants one fused kernel, not per-run calls),
dropout, sliding windows, any keyword the fast path does not understand (e.g. ``hf_kan.patches``' per-forward state,
whose masks and probability transforms only the ``hf_kan`` backend can apply), masks it cannot slice, and calls
where too little would be skipped.

What is skipped. Let g = H / H_kv (GQA group size). A key/value head is needed by a query block if any of its g query
heads has an active query in that block.

- Decode (one query per sample): per sample, the key/value heads whose g query heads are all inactive are not read.
  With plain multi-head attention (g = 1) that is every inactive head, 1 - active_fraction of the cache reads. With
  GQA few groups are entirely inactive (a group of 4 among 16 routed heads, 8 kept: 4 %), so little is skipped; the
  query rows of a partially active group are computed anyway (fewer rows per group did not run faster on CPU).
- Prefill / several queries: (query block of ``BLOCK`` rows, key/value head) pairs with no active query are
  skipped; with per-token routing nearly every block has some active query, so this triggers only for correlated
  routing (e.g. a head that a whole image or a whole padded prefix never uses).

Calls: one batched call for the key/value heads needed by every block of every sample (the shared heads, at least),
then per sample one call per run of consecutive heads with the same needed blocks. PyTorch has no CPU attention
kernel taking per-sample head indices, and gathering the active heads' keys and values into one tensor for a single
fused call copies more memory than the skipped heads would have read (``benchmarks/moh.py`` times it: several
times slower than dense), so the runs are views of the cache. Splitting one call into several costs parallelism
(PyTorch's CPU kernel runs one (sample, head, query chunk) per thread) and a fixed overhead per call, so the path is
taken only when the estimated time, counting ceil(items / threads) per call, is below the dense call's: decode with
one intra-op thread whenever a head is skipped, with many threads only for batches wide enough to fill them; prefill
when it saves at least ``MIN_PREFILL_SAVING``. Measured on one thread only (``benchmarks/moh.py``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

if TYPE_CHECKING:  # the layer module imports nothing from here; no runtime dependency either way
    from .layer import MoHLayer

MOH_ATTENTION = "hf_kan_moh"
SKIPPABLE_IMPLEMENTATIONS = ("sdpa", "hf_kan")
BLOCK = 64  # query rows per prefill block
# Decode skips only when the key/value elements it does not read (skipped (sample, key/value head) pairs x S x D)
# outweigh the fixed cost of planning and extra calls: at 1k cached keys with 4 of 16 heads of 128 skipped (= 2^19)
# benchmarks/moh.py measured 0.89x of dense against an ideal 0.75x, i.e. ~0.25 ms of that cost per attention call.
MIN_DECODE_SKIPPED = 1 << 19
MIN_PREFILL_SAVING = 0.125  # skip prefill blocks only when that is expected to save at least this share of the time
# Keywords Transformers' text attention blocks pass that the skipping path handles (checked values below).
_UNDERSTOOD_KWARGS = frozenset({"position_ids", "use_cache", "sliding_window", "is_causal", "output_attentions"})


class MoHAttentionConfig:
    """The config an attention block with MoH head skipping sees: ``_attn_implementation`` reads
    ``"hf_kan_moh"`` while the real one (``base._attn_implementation``) is skippable, every other attribute reads
    and writes through to the real, shared config ``base``."""

    __slots__ = ("base", "moh_layer")

    def __init__(self, base: Any, moh_layer: MoHLayer) -> None:
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "moh_layer", moh_layer)

    @property
    def _attn_implementation(self) -> str | None:
        real = self.base._attn_implementation
        if real in SKIPPABLE_IMPLEMENTATIONS and self.moh_layer.skips_inactive_heads():
            return MOH_ATTENTION
        return real

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.base, name, value)

    def __reduce__(self) -> tuple:
        return (type(self), (self.base, self.moh_layer))

    def __repr__(self) -> str:
        return f"MoHAttentionConfig({self.base!r})"


def install_head_skipping(attention: nn.Module, layer: MoHLayer) -> None:
    """Route ``attention``'s attention calls through ``moh_attention`` (idempotent; no-op without ``config``)."""
    config = getattr(attention, "config", None)
    if config is None or isinstance(config, MoHAttentionConfig):
        return
    AttentionInterface.register(MOH_ATTENTION, moh_attention)
    attention.config = MoHAttentionConfig(config, layer)


def remove_head_skipping(model: nn.Module) -> None:
    """Give every attention block of ``model`` its plain config back."""
    for module in model.modules():
        config = module.__dict__.get("config")
        if isinstance(config, MoHAttentionConfig):
            module.config = config.base


def moh_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function ``"hf_kan_moh"`` (``AttentionInterface`` contract, output (B, T, H, D)): attention for
    the active heads only (``skipped_head_attention``) when the call allows it, else the real implementation."""
    config = module.config
    real = ALL_ATTENTION_FUNCTIONS.get_interface(config.base._attn_implementation, None)
    active = _active_heads(config.moh_layer, query, key, dropout, kwargs)
    if active is not None:
        mask = attention_mask.materialize() if hasattr(attention_mask, "materialize") else attention_mask
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        out = skipped_head_attention(query, key, value, mask, active, scaling)
        if out is not None:
            return out, None
    return real(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _active_heads(
    layer: MoHLayer, query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """(B, T, H) bool of the heads with a non-zero gate, or None when this call must take the dense path."""
    gates = layer.pending_gates()
    if gates is None or gates.requires_grad or dropout or query.device.type != "cpu":
        return None
    if not kwargs.keys() <= _UNDERSTOOD_KWARGS or kwargs.get("sliding_window") is not None:
        return None
    if kwargs.get("is_causal") not in (None, True) or kwargs.get("output_attentions"):
        return None
    batch, heads, q_len, _ = query.shape
    if gates.shape != (batch * q_len, heads):
        return None
    return (gates != 0).view(batch, q_len, heads)


class _Call(NamedTuple):
    """One SDPA call: samples, key/value heads [kv_start, kv_end) and query rows [row_start, row_end)."""

    batch: slice
    kv_start: int
    kv_end: int
    row_start: int
    row_end: int


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of True in ``flags``."""
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if not flag:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def plan_calls(needed: torch.Tensor, q_len: int, block: int = BLOCK) -> list[_Call]:
    """The SDPA calls covering every needed (sample, key/value head, query block) of ``needed`` (B, H_kv, blocks).

    Heads needed everywhere form one call over the whole batch per run; the rest, per sample, one call per run of
    consecutive heads that need the same blocks, per run of those blocks. Blocks are ``block`` query rows.
    """
    batch, kv_heads, _ = needed.shape
    flags = needed.tolist()
    everywhere = [all(all(flags[b][j]) for b in range(batch)) for j in range(kv_heads)]
    calls = [_Call(slice(None), start, end, 0, q_len) for start, end in _runs(everywhere)]
    for b in range(batch):
        groups: list[list[Any]] = []  # [block runs, kv_start, kv_end]
        for j in range(kv_heads):
            if everywhere[j]:
                continue
            block_runs = _runs(flags[b][j])
            if not block_runs:
                continue
            if groups and groups[-1][0] == block_runs and groups[-1][2] == j:
                groups[-1][2] = j + 1
            else:
                groups.append([block_runs, j, j + 1])
        for block_runs, start, end in groups:
            for r0, r1 in block_runs:
                calls.append(_Call(slice(b, b + 1), start, end, r0 * block, min(r1 * block, q_len)))
    return calls


def _needed_blocks(active: torch.Tensor, kv_heads: int, block: int) -> torch.Tensor:
    """(B, H_kv, blocks) bool: whether any query head of the group has an active query in the block."""
    batch, q_len, heads = active.shape
    per_kv = active.view(batch, q_len, kv_heads, heads // kv_heads).any(-1)  # (B, T, H_kv)
    blocks = math.ceil(q_len / block)
    per_kv = F.pad(per_kv, (0, 0, 0, blocks * block - q_len))
    return per_kv.view(batch, blocks, block, kv_heads).any(2).transpose(1, 2)


def _block_work(q_len: int, kv_len: int, block: int) -> list[float]:
    """Work of each query block (rows x keys its last row sees, causal with the queries last), for cost estimates."""
    work = []
    for start in range(0, q_len, block):
        end = min(start + block, q_len)
        work.append(float((end - start) * (kv_len - q_len + end)))
    return work


def _prefill_pays(calls: list[_Call], batch: int, kv_heads: int, q_len: int, kv_len: int, block: int) -> bool:
    """Whether the planned calls are expected to take at most (1 - MIN_PREFILL_SAVING) of the dense call's time.

    A call's (sample, key/value head, query block) items run in parallel on the intra-op threads P: its time is
    about max(total work / P, largest item). One thread: the saved share of the work, as is."""
    work = _block_work(q_len, kv_len, block)
    threads = torch.get_num_threads()

    def time(items: int, blocks: list[float]) -> float:
        return max(items * sum(blocks) / threads, max(blocks))

    dense = time(batch * kv_heads, work)
    skipped = 0.0
    for call in calls:
        samples = batch if call.batch.start is None else 1
        blocks = work[call.row_start // block : -(-call.row_end // block)]
        skipped += time(samples * (call.kv_end - call.kv_start), blocks)
    return skipped <= (1 - MIN_PREFILL_SAVING) * dense


def skipped_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    active: torch.Tensor,
    scaling: float,
    block: int = BLOCK,
) -> torch.Tensor | None:
    """softmax(Q K^T * scaling + mask) V for the needed (sample, key/value head, query block) triples only.

    query (B, H, T, D), key / value (B, H_kv, S, D), ``attention_mask`` None (causal, or no mask when T = 1) or a
    (B or 1, 1, T, S) bool / additive mask, ``active`` (B, T, H) bool. Returns (B, T, H, D) with zeros for the
    skipped triples, equal to the dense result on every active (sample, query, head); or None when the dense call
    is expected to be faster or the inputs are outside what this path handles.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if value.shape[-1] != dim or heads % kv_heads:
        return None
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[1:] != (1, q_len, kv_len):
            return None
        if attention_mask.shape[0] not in (1, batch):
            return None
    elif q_len > 1 and kv_len != q_len:
        return None
    if q_len == 1:
        return _decode(query, key, value, attention_mask, active, scaling)
    needed = _needed_blocks(active, kv_heads, block)
    if bool(needed.all()):
        return None
    calls = plan_calls(needed, q_len, block)
    if not _prefill_pays(calls, batch, kv_heads, q_len, kv_len, block):
        return None
    out = query.new_zeros(batch, q_len, heads, dim)
    for call in calls:
        _attend(out, call, query, key, value, attention_mask, scaling)
    return out


def _decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    active: torch.Tensor,
    scaling: float,
) -> torch.Tensor | None:
    """The decode case of ``skipped_head_attention`` (one query per sample). Planned in Python from one ``tolist``
    and run with as few tensor ops per call as possible: on CPU each op costs microseconds and each extra SDPA call
    tens of them, against ~0.1 ms per head of 128 per 1k cached keys."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    flags = active.view(batch, heads).tolist()
    needed = [[any(row[j * group : (j + 1) * group]) for j in range(kv_heads)] for row in flags]
    every = [all(column) for column in zip(*needed)]
    skipped = sum(not f for row in needed for f in row)
    if skipped == 0 or skipped * key.shape[2] * dim < MIN_DECODE_SKIPPED:
        return None
    shared_runs = _runs(every)
    sample_runs = [_runs([f and not e for f, e in zip(row, every)]) for row in needed]
    # PyTorch's CPU kernel spreads a decode call over its (sample, key/value head) pairs, one thread each: with P
    # threads a call over n pairs takes ~ceil(n / P) pair-times. Skip only when the calls take fewer than the
    # dense call's ceil(B * H_kv / P) (always with one thread; never when one call's pairs already fill the threads).
    threads = torch.get_num_threads()
    cost = sum(-(-batch * (end - start) // threads) for start, end in shared_runs)
    cost += sum(-(-(end - start) // threads) for runs in sample_runs for start, end in runs)
    if cost >= -(-batch * kv_heads // threads):
        return None
    out = query.new_zeros(batch, heads, 1, dim)  # (B, H, 1, D) and (B, 1, H, D) share one memory layout

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None, dst: torch.Tensor,
               start: int, end: int) -> None:
        q = q.narrow(1, start * group, (end - start) * group)
        if group > 1:  # a group's g queries become g rows against its key/value head (no repeat of K/V)
            q = q.reshape(q.shape[0], end - start, group, dim)
        o = F.scaled_dot_product_attention(q, k.narrow(1, start, end - start), v.narrow(1, start, end - start),
                                           attn_mask=m, scale=scaling)
        dst = dst.narrow(1, start * group, (end - start) * group)
        dst.copy_(o.reshape(dst.shape))

    for start, end in shared_runs:
        attend(query, key, value, mask, out, start, end)
    for b, runs in enumerate(sample_runs):
        if runs:
            m = None if mask is None else mask[b : b + 1] if mask.shape[0] > 1 else mask
            q_b, k_b, v_b, out_b = query[b : b + 1], key[b : b + 1], value[b : b + 1], out[b : b + 1]
            for start, end in runs:
                attend(q_b, k_b, v_b, m, out_b, start, end)
    return out.transpose(1, 2)


def _attend(
    out: torch.Tensor,
    call: _Call,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> None:
    """Run one planned prefill call and write its rows into ``out`` (B, T, H, D)."""
    group = query.shape[1] // key.shape[1]
    h0, h1, t0, t1 = call.kv_start * group, call.kv_end * group, call.row_start, call.row_end
    q = query[call.batch, h0:h1, t0:t1]
    k = key[call.batch, call.kv_start : call.kv_end]
    v = value[call.batch, call.kv_start : call.kv_end]
    is_causal = False
    if mask is not None:
        mask = mask[call.batch if mask.shape[0] > 1 else slice(None), :, t0:t1]
    else:  # causal, keys = queries: rows [t0, t1) see keys [0, t1)
        k, v = k[:, :, :t1], v[:, :, :t1]
        if t0 == 0:
            is_causal = True
        else:
            rows = torch.arange(t0, t1, device=q.device)[:, None]
            mask = rows >= torch.arange(t1, device=q.device)[None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling,
                                       enable_gqa=group > 1)
    out[call.batch, t0:t1, h0:h1] = o.transpose(1, 2)


__all__ = [
    "MOH_ATTENTION",
    "SKIPPABLE_IMPLEMENTATIONS",
    "MoHAttentionConfig",
    "install_head_skipping",
    "moh_attention",
    "plan_calls",
    "remove_head_skipping",
    "skipped_head_attention",
]
