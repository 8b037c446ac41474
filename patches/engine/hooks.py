"""The two hook points the patches use: one on the top-level model, one pair per text decoder layer.

``ModelHook`` (a forward pre-hook with kwargs on the ``...ForConditionalGeneration`` module) runs before every
forward, prefill and each decode step of ``generate`` alike. It reads the patch config, makes sure the forward has an
``HFKanCache`` (``generate`` and plain forwards get one transparently), computes the ``TokenLayout`` of the new
tokens with the family adapter, appends it to the cache ledger and passes a ``ForwardState`` down as the keyword
argument ``hf_kan_state``. This is how metadata reaches the attention although ``generate`` rejects unknown kwargs
and never passes images, ``image_sizes`` or ``image_grid_thw`` to ``forward``.

The decoder-layer hooks call the active patches' ``before_layer`` (residual stream entering the layer; may return
shortened hidden states and edit the layer's kwargs, e.g. slice ``position_embeddings``) and ``after_layer``
(the layer's output). With no patch that needs them they return immediately.

``attach_hooks`` / ``detach_hooks`` install and remove them on a model; ``extra_runtime`` adds a runtime that is not a
configured patch to every forward inside a ``with`` block (label making, tests).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from transformers import Cache, DynamicCache

from ...errors import InputLayoutError, UnsupportedModelError
from .cache import HFKanCache
from .config import CONFIG_ATTRIBUTE, PatchConfig
from .dropping import sync_layer_inputs
from .layout import build_layout
from .runtime import PatchRuntime
from .spec import runtimes_for
from .state import STATE_KWARG, ForwardState

VISUAL_INPUT_KEYS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "image_sizes",
                     "mm_encoder_outputs")


def is_flash(impl) -> bool:
    return isinstance(impl, str) and "flash" in impl


def check_implementation(config: PatchConfig, impl) -> None:
    """Raise if ``impl`` cannot run the active patches."""
    if config.changes_mask and is_flash(impl):
        raise UnsupportedModelError(
            f"patch(es) {list(config.active)} change the attention mask, which {impl} cannot express; load the "
            "model with attn_implementation='hf_kan' (or {'text_config': 'hf_kan', 'vision_config': "
            "'flash_attention_2'} to keep FlashAttention in the vision tower)"
        )
    if config.active and impl != "hf_kan":
        raise UnsupportedModelError(
            f"patch(es) {list(config.active)} need the text model's attention to be 'hf_kan', not {impl!r}; call "
            "hf_kan.patches.apply(model) or model.set_attn_implementation({'text_config': 'hf_kan'})"
        )


class ModelHook:
    """Forward pre-hook of the top-level model (see the module docstring). Holds no per-call state."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __call__(self, model, args, kwargs):
        text_config = model.config.get_text_config()
        config = PatchConfig.from_dict(getattr(text_config, CONFIG_ATTRIBUTE, None))
        impl = text_config._attn_implementation
        if impl != "hf_kan":
            check_implementation(config, impl)
            return None
        if args:
            kwargs = dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
            args = ()
        input_ids = kwargs.get("input_ids")
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim != 2:
            if config.active:
                raise InputLayoutError(
                    f"hf_kan patches build masks from token metadata and need a 2-D padding mask (batch, length); got "
                    f"a {attention_mask.ndim}-D attention_mask"
                )
            return None
        cache = self._cache(model, kwargs)
        seen = cache.ledger.seen if cache is not None else 0
        if input_ids is None:
            embeds = kwargs.get("inputs_embeds")
            if config.active or embeds is None:
                raise InputLayoutError(
                    "hf_kan patches need input_ids to find the image tokens; pass input_ids instead of inputs_embeds"
                )
            input_ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            items = []
        elif any(kwargs.get(k) is not None for k in VISUAL_INPUT_KEYS if k != "mm_encoder_outputs") or kwargs.get(
            "mm_encoder_outputs"
        ):
            items = self.adapter.visual_items(model, input_ids, kwargs)
        else:
            items = []
        runtimes = runtimes_for(config)
        layout = build_layout(input_ids, attention_mask, items, offset=seen)
        for rt in runtimes:
            layout = rt.annotate_layout(layout, input_ids, offset=seen, has_visual=bool(items)) or layout
        if cache is not None:
            cache.ledger.extend(layout)
        state = ForwardState(config, layout, cache, runtimes, seen_before=seen, model=model)
        kwargs[STATE_KWARG] = state
        for rt in state.runtimes:
            rt.begin_forward(state, kwargs)
        return args, kwargs

    @staticmethod
    def after(model, args, kwargs, output):
        """Forward hook: the runtimes' ``end_forward``; the forward's ``ForwardState`` (rows per layer, layout, the
        patches' ``scratch``) is then exposed as the attribute ``output.hf_kan_state`` (not an output key) and, for
        a prefill, as ``cache.hf_kan_prefill_state`` (what ``generate`` returns)."""
        state = kwargs.get(STATE_KWARG)
        if state is None:
            return None
        for rt in state.runtimes:
            rt.end_forward(state, output)
        state._masks.clear()
        state._key_layouts.clear()
        if output is not None and not isinstance(output, tuple):
            output.hf_kan_state = state
        if state.cache is not None and state.seen_before == 0:
            state.cache.hf_kan_prefill_state = state
        return None

    @staticmethod
    def _cache(model, kwargs) -> HFKanCache | None:
        if "past_key_values" in kwargs and kwargs.get("cache") is None:
            kwargs["cache"] = kwargs.pop("past_key_values")
        cache = kwargs.get("cache")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config.get_text_config(), "use_cache", True)
        if isinstance(cache, HFKanCache):
            return cache
        if cache is None:
            if not use_cache:
                return None
        elif not (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            raise UnsupportedModelError(
                f"the hf_kan backend needs its own cache to track which positions each layer holds; got a "
                f"{type(cache).__name__} with {cache.get_seq_length() if isinstance(cache, Cache) else '?'} tokens. "
                "Start from no cache (or an empty DynamicCache / hf_kan.patches.HFKanCache) and pass back the cache "
                "the previous forward returned"
            )
        cache = HFKanCache(config=model.config.get_text_config())
        kwargs["cache"] = cache
        return cache


class LayerHooks:
    """Pre- and post-forward hooks of text decoder layer ``layer_idx``."""

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx

    def before(self, module, args, kwargs):
        state = kwargs.get(STATE_KWARG)
        if state is None or not state.layer_runtimes:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        for rt in state.layer_runtimes:
            new = rt.before_layer(state, self.layer_idx, hidden, kwargs)
            if new is not None:
                hidden = new
        sync_layer_inputs(state, self.layer_idx, kwargs)  # full-length cos/sin, position ids -> the kept rows
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def after(self, module, args, kwargs, output):
        state = kwargs.get(STATE_KWARG)
        if state is None or not state.layer_runtimes:
            return None
        hidden = output
        for rt in state.layer_runtimes:
            new = rt.after_layer(state, self.layer_idx, hidden)
            if new is not None:
                hidden = new
        return hidden


#: attribute of a model holding its hook handles (``None`` / absent: not attached)
HANDLES_ATTRIBUTE = "_hf_kan_hook_handles"


def hooks_attached(model: nn.Module) -> bool:
    return bool(getattr(model, HANDLES_ATTRIBUTE, None))


def attach_hooks(model: nn.Module, adapter) -> None:
    """Install the model hook and the decoder-layer hooks on ``model`` (once; a second call does nothing)."""
    if hooks_attached(model):
        return
    hook = ModelHook(adapter)
    handles = [model.register_forward_pre_hook(hook, with_kwargs=True),
               model.register_forward_hook(hook.after, with_kwargs=True)]
    for i, layer in enumerate(adapter.decoder_layers(model)):
        hooks = LayerHooks(i)
        handles.append(layer.register_forward_pre_hook(hooks.before, with_kwargs=True))
        handles.append(layer.register_forward_hook(hooks.after, with_kwargs=True))
    object.__setattr__(model, HANDLES_ATTRIBUTE, handles)


def detach_hooks(model: nn.Module) -> None:
    """Remove the hooks ``attach_hooks`` installed."""
    for h in getattr(model, HANDLES_ATTRIBUTE, None) or []:
        h.remove()
    object.__setattr__(model, HANDLES_ATTRIBUTE, None)


@contextlib.contextmanager
def extra_runtime(model: nn.Module, runtime: PatchRuntime):
    """Within the block, every forward of ``model`` (patched with ``apply``) also runs ``runtime`` (after the
    configured patches), e.g. a test's mask rule or DyVTE's masked exit simulation."""
    def add(module, args, kwargs):
        state = kwargs.get(STATE_KWARG)
        if state is None:
            raise InputLayoutError("this forward has no hf_kan state: call hf_kan.patches.apply(model) first")
        state.add_runtime(runtime)
        runtime.begin_forward(state, kwargs)
        return None

    handle = model.register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield runtime
    finally:
        handle.remove()


__all__ = ["HANDLES_ATTRIBUTE", "LayerHooks", "ModelHook", "attach_hooks", "check_implementation", "detach_hooks",
           "extra_runtime", "hooks_attached", "is_flash"]
