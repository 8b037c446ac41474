"""Public entry points: ``apply`` (turn patches on/off on a loaded model), ``status`` (what is active),
``detach`` (remove the hooks) and ``from_pretrained`` (load + apply). Every patch argument, the stored config and the
status come from the table of registered ``PatchSpec``s (``engine/spec.py``; the built-in patches are registered by
``registry.py`` when ``hf_kan.patches`` is imported); nothing here names a patch."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import HFKanConfigError, UnsupportedModelError
from .engine.config import CONFIG_ATTRIBUTE, PatchConfig
from .engine.hooks import attach_hooks, check_implementation, detach_hooks, hooks_attached, is_flash
from .engine.options import ApplyContext
from .engine.spec import names, specs
from .families import adapter_for


def apply(model: nn.Module, *, processor: Any = None, tokenizer: Any = None, **patches: Any) -> PatchConfig:
    """Apply or change hf_kan patches on a loaded model; returns the resulting ``PatchConfig``.

    Each keyword names a registered patch (``mma``, ``var``, ``prune``, ``dyvte``, or one registered with
    ``hf_kan.patches.registry.register``); its value is ``None`` (leave as configured), ``False`` (off), ``True``
    (on with defaults), a dict of options or the patch's config dataclass. ``processor`` / ``tokenizer`` supply the
    chat template from which MMA's assistant-turn opener is derived; VAR without ``sink_dims`` finds them with
    ``find_sink_dims(model)`` (one first-token forward) and stores its default layers explicitly; ``prune`` also takes
    ``"fastv"`` / ``"pdrop"`` (``{"method": "pdrop", "keep_ratios": [...]}``); ``dyvte`` attaches DyVTE routers to the
    model (restoring saved ones). The text model's attention is switched to ``"hf_kan"`` (the vision tower is left as
    it is), the config is stored JSON-serialisably as ``config.text_config.hf_kan`` (saved by ``save_pretrained``),
    and the model and decoder-layer hooks are attached once. Calling ``apply(model)`` with no arguments after
    ``from_pretrained`` re-attaches the hooks (and extra modules) for the saved configuration.
    """
    unknown = sorted(set(patches) - set(names()))
    if unknown:
        raise HFKanConfigError(f"unknown patch(es) {unknown}; registered patches: {list(names())}")
    adapter = adapter_for(model)
    text_config = model.config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            "hf_kan patches support full-attention decoders only; this model has layer types "
            f"{sorted(set(layer_types))}"
        )
    current = PatchConfig.from_dict(getattr(text_config, CONFIG_ATTRIBUTE, None))
    context = ApplyContext(model=model, text_config=text_config, num_layers=len(adapter.decoder_layers(model)),
                           template_source=processor or tokenizer)
    config = PatchConfig(**{spec.name: spec.resolve_argument(patches.get(spec.name), current.get(spec.name), context)
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
    setattr(text_config, CONFIG_ATTRIBUTE, config.to_dict())
    attach_hooks(model, adapter)
    return config


def detach(model: nn.Module) -> None:
    """Remove the hf_kan hooks from ``model`` (its config section and extra modules are kept; ``apply(model)``
    re-attaches)."""
    detach_hooks(model)


def status(model: nn.Module) -> dict[str, Any]:
    """What is active on ``model``: family, attention implementations, whether hooks are attached, and the patch
    options (as stored in the config)."""
    text_config = model.config.get_text_config()
    config = PatchConfig.from_dict(getattr(text_config, CONFIG_ATTRIBUTE, None))
    vision = getattr(model.config, "vision_config", None)
    return {
        "family": model.config.model_type,
        "text_attn_implementation": text_config._attn_implementation,
        "vision_attn_implementation": getattr(vision, "_attn_implementation", None),
        "hooks_attached": hooks_attached(model),
        "active": list(config.active),
        "patches": {k: v for k, v in config.to_dict().items() if k != "version"},
    }


def from_pretrained(model_class, path, *, attn_implementation=None, **kwargs):
    """``model_class.from_pretrained(path, ...)`` with the text attention on ``"hf_kan"``, then ``apply(model)``:
    the saved ``hf_kan`` section is restored and its hooks attached."""
    impl = attn_implementation if attn_implementation is not None else {"text_config": "hf_kan"}
    model = model_class.from_pretrained(path, attn_implementation=impl, **kwargs)
    apply(model)
    return model


__all__ = ["apply", "detach", "from_pretrained", "status"]
