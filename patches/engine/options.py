"""Turning ``hf_kan.patches.apply(model, <patch>=value)`` arguments and stored ``hf_kan`` sections into patch configs.

Every patch argument takes the same forms: ``None`` (keep the current setting), ``False`` (off), ``True`` (on with
defaults), a dict of options, or the patch's config dataclass. ``apply`` turns ``False`` into "off" itself; a patch's
resolver (``PatchSpec.resolve``) handles the rest and calls :func:`argument_options` for ``True`` and dicts, so the
accepted forms and the error messages are the same for every patch. :func:`parse_options` builds a config from a
checked dict (a stored section or an ``apply`` argument).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import HFKanConfigError


def check_option_names(name: str, options: Iterable[str], config_cls: type) -> None:
    """Raise ``HFKanConfigError`` if ``options`` names a field that ``config_cls`` lacks."""
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise HFKanConfigError(f"unknown option(s) {unknown} for patch {name!r}; valid options: {sorted(valid)}")


def argument_options(name: str, value: Any, config_cls: type, *, extra_forms: str = "") -> dict[str, Any]:
    """The options of a patch argument that is ``True`` (``{}``: defaults) or a dict (a checked copy).

    Any other value raises ``HFKanConfigError`` listing the accepted forms (``extra_forms`` adds patch-specific
    ones, e.g. preset names).
    """
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise HFKanConfigError(
            f"{name} must be True, False, None, {extra_forms}a dict of options or a {config_cls.__name__}; "
            f"got {value!r}"
        )
    check_option_names(name, value, config_cls)
    return dict(value)


def parse_options(name: str, config_cls: type, value: Any):
    """``config_cls(**value)`` for a dict of options (names checked, a missing required option reported as
    ``HFKanConfigError``); ``None`` / ``False`` give ``None`` (off) and an instance of ``config_cls`` is returned as
    it is."""
    if value is None or value is False:
        return None
    if isinstance(value, config_cls):
        return value
    if not isinstance(value, dict):
        raise HFKanConfigError(f"hf_kan.{name} must be a dict of options or null, got {value!r}")
    check_option_names(name, value, config_cls)
    try:
        return config_cls(**value)
    except TypeError as e:  # a required option is missing
        raise HFKanConfigError(f"hf_kan.{name}: {e}") from None


@dataclass(frozen=True)
class ApplyContext:
    """What a patch's resolver may need to know about the model ``apply`` is called on."""

    model: nn.Module
    #: the text config (``model.config.get_text_config()``)
    text_config: Any
    #: number of text decoder layers
    num_layers: int
    #: the ``processor=`` or ``tokenizer=`` given to ``apply`` (a chat template source), or ``None``
    template_source: Any = None

    @property
    def hidden_size(self) -> int | None:
        return getattr(self.text_config, "hidden_size", None)

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.text_config, "vocab_size", None)


__all__ = ["ApplyContext", "argument_options", "check_option_names", "parse_options"]
