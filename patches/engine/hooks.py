"""The hook points the patches use: one on the top-level model, one pair per text decoder layer, and a guard around
``generate``.

``ModelHook`` (a forward pre-hook with kwargs on the ``...ForConditionalGeneration`` module) runs before every
forward, prefill and each decode step of ``generate`` alike. It reads the patch config (parsed and checked against
the model once, then reused while the stored section is unchanged), makes sure the forward has an ``HFKanCache``
(``generate`` and plain forwards get one transparently), computes the ``TokenLayout`` of the new tokens with the
family adapter, appends it to the cache ledger and passes a ``ForwardState`` down as the keyword argument
``hf_kan_state``. This is how metadata reaches the attention although ``generate`` rejects unknown kwargs and never
passes images, ``image_sizes`` or ``image_grid_thw`` to ``forward``.

The decoder-layer hooks call the active patches' ``before_layer`` (residual stream entering the layer; may return
shortened hidden states and edit the layer's kwargs, e.g. slice ``position_embeddings``) and ``after_layer``
(the layer's output). With no patch that needs them they return immediately.

``GenerateGuard`` replaces ``model.generate`` on the instance (as Transformers' own ``custom_generate`` loading does)
while the hooks are attached: a chunked prefill (``generate(..., prefill_chunk_size=N)``) runs the prompt as several
forwards, and it refuses, before anything runs, a split that an active patch cannot follow exactly
(``PatchRuntime.prefill_chunk_error``).

``attach_hooks`` / ``detach_hooks`` install and remove them on a model; ``extra_runtime`` adds a runtime that is not a
configured patch to every forward inside a ``with`` block (label making, tests).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import weakref

import torch
from torch import nn
from transformers import Cache, DynamicCache

from ...errors import InputLayoutError, UnsupportedModelError
from .cache import HFKanCache, KVLedger
from .config import CONFIG_ATTRIBUTE, PatchConfig
from .dropping import sync_layer_inputs
from .layout import TextLayoutConstants, build_layout, text_layout
from .options import ApplyContext
from .runtime import PatchRuntime
from .spec import runtimes_for
from .state import STATE_KWARG, ForwardState
from .windows import layer_windows

VISUAL_INPUT_KEYS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "image_sizes",
                     "mm_encoder_outputs")
#: keyword argument through which ``extra_runtime`` hands its runtimes to the model hook (removed before forward)
EXTRA_KWARG = "hf_kan_extra_runtimes"


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


def apply_context(model: nn.Module, adapter, template_source=None) -> ApplyContext:
    """What a patch resolver may read about ``model``."""
    return ApplyContext(model=model, text_config=model.config.get_text_config(),
                        num_layers=len(adapter.decoder_layers(model)), template_source=template_source)


def model_windows(model: nn.Module, adapter) -> tuple[int | None, ...]:
    """The sliding window of every text decoder layer of ``model`` (``engine.windows``)."""
    layers = adapter.decoder_layers(model)
    return layer_windows(model.config.get_text_config(), len(layers), adapter.language_model(model))


def placeholder_ids(model: nn.Module) -> tuple[int, ...]:
    """Token ids that stand for image / video content in ``model``'s prompts."""
    cfg = model.config
    return tuple(v for v in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
                 if isinstance(v, int))


def trailing_visual_run(ledger: KVLedger | None, batch_size: int) -> list[int]:
    """Per sample, how many visual tokens end the ledger's token table (an image the previous forward cut off)."""
    if ledger is None or ledger.tokens is None:
        return [0] * batch_size
    run = ledger.tokens.visual.flip(1).to(torch.int8).cumprod(1).sum(1)
    return [int(x) for x in run.tolist()]


class ModelHook:
    """Forward pre-hook of the top-level model (see the module docstring). Caches what does not change between
    forwards: the parsed, checked config (until the stored section changes), the layer windows (until ``apply`` or
    another text config), and the read-only tensors text-only layouts are views of."""

    def __init__(self, adapter):
        self.adapter = adapter
        self._layer_handles: list | None = None  # the decoder-layer hooks, installed while a runtime needs them
        self._parsed = None  # (the stored section object, a copy of it, the PatchConfig parsed from it)
        self._windows: tuple[object, tuple[int | None, ...]] | None = None  # (text config, windows)
        self._constants = TextLayoutConstants()
        self._placeholders: dict = {}  # device -> the image / video placeholder ids
        self._text_config = None  # (top-level config, its text config)

    def config(self, model, text_config=None) -> PatchConfig:
        """The model's patch config, parsed and checked against the model (each patch's resolver, as ``apply`` does
        for its arguments); reused until the stored section changes."""
        text_config = text_config if text_config is not None else model.config.get_text_config()
        section = getattr(text_config, CONFIG_ATTRIBUTE, None)
        parsed = self._parsed  # one attribute, replaced whole: a concurrent forward sees an old or a new triple
        if parsed is not None and parsed[0] is section and parsed[1] == section:
            return parsed[2]
        config = PatchConfig.from_dict(section).resolved(apply_context(model, self.adapter))
        self._parsed = (section, copy.deepcopy(section), config)
        return config

    def windows(self, model, text_config=None) -> tuple[int | None, ...]:
        """Per decoder layer, its sliding window (``engine.windows``); read again by ``apply`` (``refresh``)."""
        text_config = text_config if text_config is not None else model.config.get_text_config()
        if self._windows is None or self._windows[0] is not text_config:
            self._windows = (text_config, model_windows(model, self.adapter))
        return self._windows[1]

    def refresh(self) -> None:
        """Forget the cached config and windows and remove the decoder-layer hooks (``apply`` calls this: the text
        config and the patches may have changed)."""
        self._parsed = self._windows = self._text_config = None
        self._placeholders.clear()
        self.remove()

    def text_config(self, model):
        """``model.config.get_text_config()``, looked up once per top-level config object (it walks the sub-configs
        through Transformers' attribute hooks, a sizeable part of a decode step's overhead)."""
        cached = self._text_config
        if cached is None or cached[0] is not model.config:
            cached = self._text_config = (model.config, model.config.get_text_config())
        return cached[1]

    def __call__(self, model, args, kwargs):
        extra = kwargs.pop(EXTRA_KWARG, ())
        text_config = self.text_config(model)
        impl = text_config._attn_implementation
        config = self.config(model, text_config)
        if impl != "hf_kan":
            check_implementation(config, impl)
            return (args, kwargs) if extra else None
        if args:
            kwargs = dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
            args = ()
        input_ids = kwargs.get("input_ids")
        attention_mask = kwargs.get("attention_mask")
        runtimes = runtimes_for(config)
        if extra:
            runtimes += extra
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim != 2:
            if runtimes:
                raise InputLayoutError(
                    f"hf_kan patches build masks from token metadata and need a 2-D padding mask (batch, length); got "
                    f"a {attention_mask.ndim}-D attention_mask"
                )
            return args, kwargs
        cache = self._cache(kwargs, text_config)
        ledger = cache.ledger if cache is not None else None
        seen = ledger.seen if ledger is not None else 0
        if input_ids is None:
            embeds = kwargs.get("inputs_embeds")
            if runtimes or embeds is None:
                raise InputLayoutError(
                    "hf_kan patches need input_ids to find the image tokens; pass input_ids instead of inputs_embeds"
                )
            input_ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        items = self.visual_items(model, input_ids, kwargs, ledger) if runtimes else []
        if items:
            layout, plain = build_layout(input_ids, attention_mask, items, offset=seen), None
        else:
            layout, plain = text_layout(input_ids, attention_mask, seen, self._constants)
        annotated = False
        for rt in runtimes:
            new = rt.annotate_layout(layout, input_ids, offset=seen, has_visual=bool(items))
            if new is not None:
                layout, annotated = new, True
        widened = annotated and bool((layout.span_end > layout.position).any())
        if ledger is not None:
            ledger.extend(layout, plain_text=None if annotated else plain)
        state = ForwardState(config, layout, cache, runtimes, seen_before=seen, model=model,
                             windows=self.windows(model, text_config), widened=widened)
        if state.layer_runtimes:
            self.layer_hooks(model)
        # weak, and dropped by ``release``: a state kept on an output or a cache must not hold the model
        state.needs_layer_hooks = functools.partial(self.layer_hooks, weakref.proxy(model))
        kwargs[STATE_KWARG] = state
        for rt in runtimes:
            rt.begin_forward(state, kwargs)
        return args, kwargs

    def layer_hooks(self, model) -> None:
        """Install the decoder-layer hooks when a forward first has a runtime that uses them; they stay until the next
        ``apply`` (``refresh``), so a concurrent forward never loses them. Until then, forwards with no such runtime
        (every patch off, MMA) pay no hook dispatch per layer."""
        if self._layer_handles:
            return
        self._layer_handles = []
        for i, layer in enumerate(self.adapter.decoder_layers(model)):
            hooks = LayerHooks(i)
            self._layer_handles += [layer.register_forward_pre_hook(hooks.before, with_kwargs=True),
                                    layer.register_forward_hook(hooks.after, with_kwargs=True)]

    def remove(self) -> None:
        """Remove the decoder-layer hooks (``detach_hooks`` calls this like a hook handle's ``remove``)."""
        for h in self._layer_handles or []:
            h.remove()
        self._layer_handles = None

    def visual_items(self, model, input_ids: torch.Tensor, inputs: dict, ledger: KVLedger | None) -> list:
        """The visual items of this forward (``FamilyAdapter.visual_items``). Image placeholders with no image inputs
        are an error: the patches would read them as text."""
        if any(inputs.get(k) is not None for k in VISUAL_INPUT_KEYS if k != "mm_encoder_outputs") or inputs.get(
            "mm_encoder_outputs"
        ):
            lead = trailing_visual_run(ledger, input_ids.shape[0])
            return self.adapter.visual_items(model, input_ids, inputs, lead)
        ids = self._placeholders.get(input_ids.device)
        if ids is None:
            ids = self._placeholders[input_ids.device] = torch.tensor(placeholder_ids(model), dtype=torch.long,
                                                                      device=input_ids.device)
        if ids.numel() and bool(torch.isin(input_ids, ids).any()):
            raise InputLayoutError(
                f"the input_ids hold image/video placeholder tokens {ids.tolist()} but the forward has no image inputs "
                "(pixel_values, image_sizes / image_grid_thw or pre-encoded features); the hf_kan patches would read "
                "them as text. Pass the images with the prompt; when generating, keep the model from emitting "
                f"placeholders with generate(..., suppress_tokens={ids.tolist()})"
            )
        return []

    @staticmethod
    def after(model, args, kwargs, output):
        """Forward hook: the runtimes' ``end_forward``; the forward's ``ForwardState`` (rows per layer, layout, the
        patches' ``scratch``) is then exposed as the attribute ``output.hf_kan_state`` (not an output key) and, for
        a prefill, as ``cache.hf_kan_prefill_state`` (what ``generate`` returns): the latest forward that started the
        cache or brought more than one token (a conversation's new turn, a chunked prefill's chunk)."""
        state = kwargs.get(STATE_KWARG)
        if state is None:
            return None
        for rt in state.runtimes:
            rt.end_forward(state, output)
        state.release()
        if output is not None and not isinstance(output, tuple):
            object.__setattr__(output, "hf_kan_state", state)  # an attribute, not a ModelOutput key
        if state.cache is not None and (state.seen_before == 0 or state.layout.length > 1):
            state.cache.hf_kan_prefill_state = state
        return None

    @staticmethod
    def _cache(kwargs, text_config) -> HFKanCache | None:
        if "past_key_values" in kwargs and kwargs.get("cache") is None:
            kwargs["cache"] = kwargs.pop("past_key_values")
        cache = kwargs.get("cache")
        if isinstance(cache, HFKanCache):
            return cache
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(text_config, "use_cache", True)
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
        cache = HFKanCache(config=text_config)
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


# ------------------------------------------------------------------------------------------- chunked prefill


def _prompt_of(model, args, kwargs) -> tuple[torch.Tensor, int, Cache | None] | None:
    """``(new token ids, their first original position, cache)`` of the prompt ``generate`` will prefill, as
    ``GenerationMixin._prefill`` slices it (``None`` when ``generate`` gets no ``input_ids``)."""
    input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if isinstance(cache, Cache) else 0
    mask = kwargs.get("attention_mask")
    if past and (mask is None or mask.shape[1] == input_ids.shape[1]):
        return input_ids[:, past:], past, cache
    return input_ids, past, cache


def prefill_chunk_size(model, kwargs) -> int | None:
    """The ``prefill_chunk_size`` a ``generate`` call runs with (its keyword, its ``generation_config``, or the
    model's)."""
    if "prefill_chunk_size" in kwargs:
        return kwargs["prefill_chunk_size"]
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(gc, "prefill_chunk_size", None)


def check_prefill_chunks(model, hook: ModelHook, args, kwargs) -> None:
    """Raise ``InputLayoutError`` naming ``prefill_chunk_size`` when ``generate(*args, **kwargs)`` would prefill the
    prompt in chunks that an active patch cannot follow exactly (``PatchRuntime.prefill_chunk_error``)."""
    chunk = prefill_chunk_size(model, kwargs)
    if chunk is None or model.config.get_text_config()._attn_implementation != "hf_kan":
        return
    runtimes = runtimes_for(hook.config(model))
    prompt = _prompt_of(model, args, kwargs)
    if not runtimes or prompt is None:
        return
    ids, offset, cache = prompt
    if ids.shape[1] <= chunk:
        return
    ledger = cache.ledger if isinstance(cache, HFKanCache) else None
    items = hook.visual_items(model, ids, kwargs, ledger)
    layout = build_layout(ids, kwargs.get("attention_mask"), items, offset=offset)
    for rt in runtimes:
        layout = rt.annotate_layout(layout, ids, offset=offset, has_visual=bool(items)) or layout
    starts = list(range(offset, offset + ids.shape[1], chunk))
    reasons = [r for r in (rt.prefill_chunk_error(layout, starts) for rt in runtimes) if r]
    if reasons:
        raise InputLayoutError(
            f"generate(..., prefill_chunk_size={chunk}) would prefill this {ids.shape[1]}-token prompt in "
            f"{len(starts)} forwards, and {'; '.join(reasons)}. Use prefill_chunk_size=None (or one at least as "
            "long as the prompt), or turn that patch off for this call"
        )


class GenerateGuard:
    """What ``model.generate`` is while the hooks are attached: ``check_prefill_chunks``, then the generate the model
    had before (an instance attribute such as a ``custom_generate``, else its class's)."""

    def __init__(self, model: nn.Module, hook: ModelHook, previous):
        self._model = weakref.ref(model)
        self.hook = hook
        self.previous = previous
        functools.update_wrapper(self, previous if previous is not None else type(model).generate)
        self.__signature__ = inspect.signature(previous if previous is not None else model.generate)

    def __call__(self, *args, **kwargs):
        model = self._model()
        check_prefill_chunks(model, self.hook, args, kwargs)
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(model).generate(model, *args, **kwargs)

    def __reduce__(self):  # copies and pickles point at the copied model (the weak reference does not pickle)
        return GenerateGuard, (self._model(), self.hook, self.previous)


#: attribute of a model holding its hook handles (``None`` / absent: not attached)
HANDLES_ATTRIBUTE = "_hf_kan_hook_handles"


def hooks_attached(model: nn.Module) -> bool:
    return bool(getattr(model, HANDLES_ATTRIBUTE, None))


def model_hook(model: nn.Module) -> ModelHook | None:
    """The ``ModelHook`` attached to ``model`` (``None`` when not attached)."""
    handles = getattr(model, HANDLES_ATTRIBUTE, None)
    return next((h for h in handles if isinstance(h, ModelHook)), None) if handles else None


def attach_hooks(model: nn.Module, adapter) -> None:
    """Install the model hook (which adds the decoder-layer hooks while a forward needs them) and the generate guard
    on ``model`` (once; a second call does nothing)."""
    if hooks_attached(model):
        return
    hook = ModelHook(adapter)
    # the model hook installs the decoder-layer hooks itself when a forward needs them; removing it removes them
    handles = [model.register_forward_pre_hook(hook, with_kwargs=True),
               model.register_forward_hook(hook.after, with_kwargs=True), hook]
    if hasattr(model, "generate"):
        guard = GenerateGuard(model, hook, model.__dict__.get("generate"))
        object.__setattr__(model, "generate", guard)
    object.__setattr__(model, HANDLES_ATTRIBUTE, handles)


def detach_hooks(model: nn.Module) -> None:
    """Remove the hooks and the generate guard ``attach_hooks`` installed."""
    for h in getattr(model, HANDLES_ATTRIBUTE, None) or []:
        h.remove()
    guard = model.__dict__.get("generate")
    if isinstance(guard, GenerateGuard):
        if guard.previous is not None:
            object.__setattr__(model, "generate", guard.previous)
        else:
            del model.__dict__["generate"]
    object.__setattr__(model, HANDLES_ATTRIBUTE, None)


@contextlib.contextmanager
def extra_runtime(model: nn.Module, runtime: PatchRuntime):
    """Within the block, every forward of ``model`` (patched with ``apply``) also runs ``runtime`` (after the
    configured patches), e.g. a test's mask rule or DyVTE's masked exit simulation."""
    if not hooks_attached(model):
        raise InputLayoutError("extra_runtime needs a model patched with hf_kan.patches.apply(model)")

    def add(module, args, kwargs):
        kwargs[EXTRA_KWARG] = (*kwargs.get(EXTRA_KWARG, ()), runtime)
        return args, kwargs

    handle = model.register_forward_pre_hook(add, with_kwargs=True, prepend=True)
    try:
        yield runtime
    finally:
        handle.remove()


__all__ = ["EXTRA_KWARG", "HANDLES_ATTRIBUTE", "GenerateGuard", "LayerHooks", "ModelHook", "apply_context",
           "attach_hooks", "check_implementation", "check_prefill_chunks", "detach_hooks", "extra_runtime",
           "hooks_attached", "is_flash", "model_hook", "model_windows", "placeholder_ids", "trailing_visual_run"]
