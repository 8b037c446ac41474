"""Public entry points: ``apply`` (turn patches on/off on a loaded model), ``status`` (what is active),
``detach`` (remove the hooks) and ``from_pretrained`` (load + apply)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import HFKanConfigError, UnsupportedModelError
from .arguments import argument_options
from .config import CONFIG_ATTRIBUTE, MMAConfig, PatchConfig, _parse_sub
from .dyvte import attach_routers, router_hook
from .dyvte_config import DyVTEConfig, resolve_dyvte
from .families import adapter_for
from .hooks import LayerHooks, ModelHook, check_implementation, is_flash
from .pruning_config import PruneConfig, resolve_prune
from .template import assistant_opener_ids
from .var import resolve_var
from .var_config import VARConfig

_HANDLES = "_hf_kan_hook_handles"


def _resolve_mma(value, current: MMAConfig | None, template_source, vocab_size: int | None) -> MMAConfig | None:
    if value is None:
        return current
    if value is False:
        return None
    if isinstance(value, MMAConfig):
        cfg = value
    else:
        value = argument_options("mma", value, MMAConfig)
        if "assistant_token_ids" not in value:
            if template_source is not None:
                value["assistant_token_ids"] = assistant_opener_ids(template_source)
            elif current is not None:
                value["assistant_token_ids"] = current.assistant_token_ids
            else:
                raise HFKanConfigError(
                    "MMA needs the token ids that open the assistant turn: pass processor=... (or tokenizer=...) so "
                    "they are derived from its chat template, or mma={'assistant_token_ids': [...]}"
                )
        cfg = _parse_sub("mma", MMAConfig, value)
    if vocab_size is not None and any(i >= vocab_size for i in cfg.assistant_token_ids):
        raise HFKanConfigError(
            f"mma.assistant_token_ids {list(cfg.assistant_token_ids)} contains ids outside the vocabulary "
            f"(size {vocab_size}); were they made by another model's tokenizer?"
        )
    return cfg


def apply(model: nn.Module, *, mma: bool | dict | MMAConfig | None = None, var: bool | dict | VARConfig | None = None,
          prune: bool | str | dict | PruneConfig | None = None, dyvte: bool | dict | DyVTEConfig | None = None,
          processor: Any = None, tokenizer: Any = None) -> PatchConfig:
    """Apply or change hf_kan patches on a loaded model; returns the resulting ``PatchConfig``.

    Each patch argument is ``None`` (leave as configured), ``False`` (off), ``True`` (on with defaults), a dict of
    options or a config dataclass. ``processor`` / ``tokenizer`` supply the chat template from which MMA's
    assistant-turn opener is derived; VAR without ``sink_dims`` finds them with ``find_sink_dims(model)`` (one
    first-token forward) and stores its default layers explicitly; ``prune`` takes ``"fastv"``, ``"pdrop"``, a dict
    (``{"method": "pdrop", "keep_ratios": [...]}``) or a ``PruneConfig``; ``dyvte`` attaches DyVTE routers to the
    model (restoring saved ones, see ``dyvte.attach_routers``). The text model's attention is switched to
    ``"hf_kan"`` (the vision tower is left as it is), the config is stored JSON-serialisably as
    ``config.text_config.hf_kan`` (saved by ``save_pretrained``), and the model and decoder-layer hooks are
    attached once. Calling ``apply(model)`` with no arguments after ``from_pretrained`` re-attaches the hooks for
    the saved configuration.
    """
    adapter = adapter_for(model)
    text_config = model.config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            "hf_kan patches support full-attention decoders only; this model has layer types "
            f"{sorted(set(layer_types))}"
        )
    current = PatchConfig.from_dict(getattr(text_config, CONFIG_ATTRIBUTE, None))
    config = current.replace(mma=_resolve_mma(mma, current.mma, processor or tokenizer,
                                              getattr(text_config, "vocab_size", None)))
    config = config.replace(var=resolve_var(var, current.var, model, len(adapter.decoder_layers(model))))
    config = config.replace(prune=resolve_prune(prune, current.prune, len(adapter.decoder_layers(model))))
    config = config.replace(dyvte=resolve_dyvte(dyvte, current.dyvte, len(adapter.decoder_layers(model)),
                                                text_config.hidden_size))
    attach_routers(model, config.dyvte)
    impl = text_config._attn_implementation
    if is_flash(impl):
        check_implementation(config, impl)
    elif impl != "hf_kan":
        model.set_attn_implementation({"text_config": "hf_kan"})
        if model.config.get_text_config()._attn_implementation != "hf_kan":
            raise UnsupportedModelError(f"could not switch {type(model).__name__}'s text attention to 'hf_kan'")
    setattr(text_config, CONFIG_ATTRIBUTE, config.to_dict())
    if not getattr(model, _HANDLES, None):
        hook = ModelHook(adapter)
        handles = [model.register_forward_pre_hook(hook, with_kwargs=True),
                   model.register_forward_hook(hook.after, with_kwargs=True)]
        for i, layer in enumerate(adapter.decoder_layers(model)):
            hooks = LayerHooks(i)
            handles.append(layer.register_forward_pre_hook(hooks.before, with_kwargs=True))
            handles.append(layer.register_forward_hook(hooks.after, with_kwargs=True))
        handles.append(model.register_forward_pre_hook(router_hook, with_kwargs=True))  # after ModelHook
        object.__setattr__(model, _HANDLES, handles)
    return config


def detach(model: nn.Module) -> None:
    """Remove the hf_kan hooks from ``model`` (its config section is kept; ``apply(model)`` re-attaches)."""
    for h in getattr(model, _HANDLES, None) or []:
        h.remove()
    object.__setattr__(model, _HANDLES, None)


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
        "hooks_attached": bool(getattr(model, _HANDLES, None)),
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
