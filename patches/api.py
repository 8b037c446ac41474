"""Public entry points: ``apply`` (turn patches on/off on a loaded model), ``status`` (what is active),
``detach`` (back to stock attention) and ``from_pretrained`` (load + apply). Every patch argument, the stored config
and the status come from the table of registered ``PatchSpec``s (``engine/spec.py``; the built-in patches are
registered by ``registry.py`` when ``hf_kan.patches`` is imported); nothing here names a patch.

Saved checkpoints: while a patch is on, ``apply`` also sets the top-level config attribute ``attn_implementation =
{"text_config": "hf_kan"}``, which ``save_pretrained`` writes to ``config.json``. ``PretrainedConfig`` takes
``attn_implementation`` as a constructor argument (applied recursively to sub-configs), so EVERY Transformers load
path (``from_pretrained`` of the family class, ``AutoModelForImageTextToText``, ``AutoModelForMultimodalLM``,
``AutoModel``) builds the text model on the ``"hf_kan"`` attention again: with hf_kan imported, its first forward
raises until ``apply(model)`` (or ``hf_kan.patches.from_pretrained``) attaches the saved patches; without hf_kan,
Transformers refuses the unknown implementation at load time. Nothing runs stock attention while the config says a
patch is on. An explicit ``from_pretrained(..., attn_implementation=...)`` still wins, as in Transformers.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from ..errors import HFKanConfigError, UnsupportedModelError
from .engine.config import CONFIG_ATTRIBUTE, PatchConfig
from .engine.hooks import (
    apply_context,
    attach_hooks,
    check_implementation,
    detach_hooks,
    hooks_attached,
    is_flash,
    model_hook,
    model_windows,
)
from .engine.spec import names, specs
from .families import adapter_for

#: the top-level config attribute that makes a saved checkpoint load on the "hf_kan" text attention
SAVED_ATTRIBUTE = "attn_implementation"
SAVED_VALUE = {"text_config": "hf_kan"}
#: attribute of a model holding the text attention implementation it had before ``apply`` switched it
PREVIOUS_ATTRIBUTE = "_hf_kan_previous_text_attn"


def _mark_for_saving(model: nn.Module, active: bool) -> None:
    """Set (patches on) or remove (all off) ``model.config.attn_implementation`` (see the module docstring)."""
    if active:
        setattr(model.config, SAVED_ATTRIBUTE, dict(SAVED_VALUE))
    elif getattr(model.config, SAVED_ATTRIBUTE, None) == SAVED_VALUE:
        delattr(model.config, SAVED_ATTRIBUTE)


def apply(model: nn.Module, *, processor: Any = None, tokenizer: Any = None, **patches: Any) -> PatchConfig:
    """Apply or change hf_kan patches on a loaded model; returns the resulting ``PatchConfig``.

    Each keyword names a registered patch (``mma``, ``var``, ``prune``, ``dyvte``, or one registered with
    ``hf_kan.patches.registry.register``); its value is ``None`` (leave as configured), ``False`` (off), ``True``
    (on with defaults), a dict of options or the patch's config dataclass. ``processor`` / ``tokenizer`` supply the
    chat template from which MMA's assistant-turn opener is derived; VAR without ``sink_dims`` finds them with
    ``find_sink_dims(model)`` (one first-token forward) and stores its default layers explicitly; ``prune`` also takes
    ``"fastv"`` / ``"pdrop"`` (``{"method": "pdrop", "keep_ratios": [...]}``); ``dyvte`` attaches DyVTE routers to the
    model (restoring saved ones). Settings kept from the stored config get the same model checks as arguments
    (vocabulary, hidden size, layer count). The text model's attention is switched to ``"hf_kan"`` (the vision tower
    is left as it is), the config is stored JSON-serialisably as ``config.text_config.hf_kan`` (saved by
    ``save_pretrained``, together with the text attention implementation), and the model and decoder-layer hooks are
    attached once. Calling ``apply(model)`` with no arguments after ``from_pretrained`` re-attaches the hooks (and
    extra modules) for the saved configuration. Sliding-window text layers are supported (the masks apply each
    layer's window by original position); attention the masks cannot express is refused.
    """
    unknown = sorted(set(patches) - set(names()))
    if unknown:
        raise HFKanConfigError(f"unknown patch(es) {unknown}; registered patches: {list(names())}")
    adapter = adapter_for(model)
    text_config = model.config.get_text_config()
    model_windows(model, adapter)  # refuses attention the metadata masks cannot express
    current = PatchConfig.from_dict(getattr(text_config, CONFIG_ATTRIBUTE, None))
    context = apply_context(model, adapter, template_source=processor or tokenizer)
    # a setting kept from the stored config (argument None or absent) goes through the resolver like an argument
    config = PatchConfig(**{
        spec.name: spec.resolve_argument(
            current.get(spec.name) if patches.get(spec.name) is None else patches[spec.name],
            current.get(spec.name), context)
        for spec in specs()})
    for spec in specs():
        if spec.attach is not None and config.get(spec.name) is not None:
            spec.attach(model, config.get(spec.name))
    impl = text_config._attn_implementation
    if is_flash(impl):
        check_implementation(config, impl)
    elif impl != "hf_kan":
        model.set_attn_implementation({"text_config": "hf_kan"})
        if model.config.get_text_config()._attn_implementation != "hf_kan":
            raise UnsupportedModelError(f"could not switch {type(model).__name__}'s text attention to 'hf_kan'")
        object.__setattr__(model, PREVIOUS_ATTRIBUTE, impl)
    setattr(text_config, CONFIG_ATTRIBUTE, config.to_dict())
    _mark_for_saving(model, bool(config.active))
    attach_hooks(model, adapter)
    model_hook(model).refresh()
    return config


def detach(model: nn.Module) -> None:
    """Back to stock attention: remove the hf_kan hooks and switch the text attention to the implementation it had
    before ``apply`` (``"sdpa"`` if it was loaded on ``"hf_kan"``), so the model computes exactly what stock
    Transformers computes, whatever was active. The config section and extra modules (DyVTE routers) are kept:
    ``apply(model)`` re-attaches, and a checkpoint saved now still loads patched."""
    detach_hooks(model)
    text_config = model.config.get_text_config()
    if text_config._attn_implementation == "hf_kan":
        previous = getattr(model, PREVIOUS_ATTRIBUTE, None) or "sdpa"
        model.set_attn_implementation({"text_config": previous})


def status(model: nn.Module) -> dict[str, Any]:
    """What is active on ``model``: family, attention implementations, whether hooks are attached, and the patch
    options (as stored in the config). ``running`` says whether the active patches run on this model object now
    (hooks attached and text attention ``"hf_kan"``)."""
    text_config = model.config.get_text_config()
    config = PatchConfig.from_dict(getattr(text_config, CONFIG_ATTRIBUTE, None))
    vision = getattr(model.config, "vision_config", None)
    attached = hooks_attached(model)
    return {
        "family": model.config.model_type,
        "text_attn_implementation": text_config._attn_implementation,
        "vision_attn_implementation": getattr(vision, "_attn_implementation", None),
        "hooks_attached": attached,
        "active": list(config.active),
        "running": bool(config.active) and attached and text_config._attn_implementation == "hf_kan",
        "patches": {k: v for k, v in config.to_dict().items() if k != "version"},
    }


#: top-level attributes under which patches save their own weights (DyVTE's routers: ``hf_kan_dyvte.``)
PATCH_WEIGHTS_PATTERN = r"^hf_kan_"


@contextlib.contextmanager
def _patch_weights_expected():
    """Keep the weights patches save (``hf_kan_<patch>.*``) out of Transformers' load report for one load.

    They are not part of the stock architecture, so Transformers lists them as unexpected and skips them;
    ``apply`` restores them from the checkpoint right after. Models read the pattern from
    ``PreTrainedModel._keys_to_ignore_on_load_unexpected`` when they are built, so it is set only for the duration of
    the load (none of the supported families defines its own)."""
    from transformers import PreTrainedModel

    had = "_keys_to_ignore_on_load_unexpected" in PreTrainedModel.__dict__
    previous = PreTrainedModel.__dict__.get("_keys_to_ignore_on_load_unexpected")
    PreTrainedModel._keys_to_ignore_on_load_unexpected = [*(previous or []), PATCH_WEIGHTS_PATTERN]
    try:
        yield
    finally:
        if had:
            PreTrainedModel._keys_to_ignore_on_load_unexpected = previous
        else:
            del PreTrainedModel._keys_to_ignore_on_load_unexpected


def from_pretrained(model_class, path, *, attn_implementation=None, **kwargs):
    """``model_class.from_pretrained(path, ...)`` with the text attention on ``"hf_kan"``, then ``apply(model)``:
    the saved ``hf_kan`` section is checked against the model, restored and its hooks attached (saved patch weights,
    such as DyVTE's routers, included; they are not reported as unexpected keys)."""
    impl = attn_implementation if attn_implementation is not None else {"text_config": "hf_kan"}
    with _patch_weights_expected():
        model = model_class.from_pretrained(path, attn_implementation=impl, **kwargs)
    apply(model)
    return model


__all__ = ["apply", "detach", "from_pretrained", "status"]
