"""The ``"hf_kan"`` attention implementation.

Registered with BOTH ``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask
builder) when ``hf_kan`` is imported. Without the second registration Transformers would silently drop padding
masks for this implementation name.

- Text decoder attention with a ``ForwardState`` in its keyword arguments (put there by the model hook that
  ``hf_kan.patches.apply`` installs): the mask Transformers built is ignored; the layer's mask is derived from the
  token metadata, the layer's sliding window and the cache ledger, and the output is computed on the path
  ``engine.compute.select_compute`` picks: the fused Triton kernel reading that metadata
  (``ForwardState.attention_metadata``; CUDA), or SDPA under the materialised mask (``ForwardState.mask_for``; CPU,
  the reference), with explicit probabilities on layers where a patch transforms them. The ``sliding_window`` a
  model passes to its attention function must be the window the config declares for that layer
  (``engine.windows``); anything else raises.
- Anything else (vision towers, a model loaded with ``attn_implementation="hf_kan"`` but never given the hook): the
  mask builder's deferred mask is materialised exactly as ``sdpa`` would build it, and SDPA runs; the result equals
  ``"sdpa"``. If the config enables a patch but the hook is missing, a clear error says to call ``apply``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ...errors import InputLayoutError, UnsupportedModelError
from .compute import explicit_attention, kernel_compute, sdpa_compute
from .config import CONFIG_ATTRIBUTE
from .state import STATE_KWARG

IMPLEMENTATION = "hf_kan"


class DeferredMask:
    """What the ``hf_kan`` mask builder returns: the mask arguments, materialised (as ``sdpa_mask``) only if the
    attention function has no token metadata and needs a standard mask."""

    __slots__ = ("_kwargs", "_mask", "_done")

    def __init__(self, **kwargs):
        self._kwargs = kwargs
        self._done = False
        self._mask = None

    def materialize(self) -> torch.Tensor | None:
        if not self._done:
            self._mask = sdpa_mask(**self._kwargs)
            self._done = True
        return self._mask


def hf_kan_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                **kwargs) -> DeferredMask:
    """Mask builder registered with ``AttentionMaskInterface``: defers the work (see ``DeferredMask``)."""
    kwargs.pop("dtype", None)
    kwargs.pop("config", None)
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    return DeferredMask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def _is_decoder_attention(module) -> bool:
    return getattr(module, "layer_idx", None) is not None and getattr(module, "is_causal", False)


def _has_active_patches(module) -> bool:
    section = getattr(getattr(module, "config", None), CONFIG_ATTRIBUTE, None)
    return isinstance(section, dict) and any(k != "version" and v for k, v in section.items())


def hf_kan_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered as ``"hf_kan"`` (contract of ``AttentionInterface``): returns
    ``(output (B, T, H, D), None)``."""
    state = kwargs.pop(STATE_KWARG, None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if state is None or not _is_decoder_attention(module):
        if state is None and _is_decoder_attention(module) and _has_active_patches(module):
            raise InputLayoutError(
                "this model's config enables hf_kan patches but the model has no hf_kan hook (e.g. a checkpoint saved "
                "with patches on, loaded with a plain from_pretrained); call hf_kan.patches.apply(model) once to "
                "attach them, or load with hf_kan.patches.from_pretrained(ModelClass, path). To run it without the "
                "patches, load with attn_implementation='sdpa' or call hf_kan.patches.detach(model)"
            )
        if isinstance(attention_mask, DeferredMask):
            attention_mask = attention_mask.materialize()
        return sdpa_compute(module, query, key, value, attention_mask, scaling, dropout, kwargs.get("is_causal")), None
    layer_idx = module.layer_idx
    window = kwargs.get("sliding_window")
    if window != state.window(layer_idx) and "sliding_window" in kwargs:
        raise UnsupportedModelError(
            f"text layer {layer_idx} attends with sliding_window={window} but its config declares "
            f"{state.window(layer_idx)} (layer_types / sliding_window); hf_kan builds the masks from the config, so "
            "this model's attention cannot be reproduced exactly"
        )
    transform = None
    for rt in state.runtimes:
        fn = rt.probs_transform(state, layer_idx)
        if fn is not None:
            if transform is not None:
                raise InputLayoutError(f"two patches transform attention probabilities on layer {layer_idx}")
            transform = fn
    var_spec = getattr(transform, "var_spec", None)
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    path = state.compute_path(query, var=transform is not None, grad=grad,
                              blocker=_kernel_blocker(state, dropout, transform, var_spec))
    lse = None
    if path == "triton":
        spec = None if transform is None else var_spec(key.shape[2])
        out, res = kernel_compute(query, key, value, state, layer_idx, scaling, var=spec,
                                  lse=bool(state.layer_runtimes))
        if res is not None:
            lse = res.lse
            record = getattr(transform, "record_selected", None)
            if record is not None and res.var_selected is not None:
                record(res.var_selected)
    elif transform is not None:
        mask, _ = state.mask_for(layer_idx, key.shape[2])
        out = explicit_attention(module, query, key, value, mask, scaling, transform,
                                 first_row=getattr(transform, "first_row", 0))
    else:
        mask, is_causal = state.mask_for(layer_idx, key.shape[2])
        out = sdpa_compute(module, query, key, value, mask, scaling, dropout, is_causal)
    for rt in state.layer_runtimes:
        rt.observe_attention(state, layer_idx, module, query, key, scaling, lse=lse)
    return out, None


def _kernel_blocker(state, dropout: float, transform, var_spec) -> str | None:
    """What this layer needs that the fused kernel cannot compute (``None``: nothing)."""
    if dropout:
        return f"attention dropout ({dropout})"
    if state.mask_runtimes:
        return "the mask_rule of " + ", ".join(repr(rt.name) for rt in state.mask_runtimes)
    if transform is not None and var_spec is None:
        return "explicit attention probabilities (a probs_transform with no var_spec, or a VAR layer being recorded)"
    return None


def register() -> None:
    """Register ``"hf_kan"`` with Transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, hf_kan_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, hf_kan_mask)


__all__ = ["IMPLEMENTATION", "DeferredMask", "hf_kan_attention", "hf_kan_mask", "register"]
