"""The shared part of turning ``hf_kan.patches.apply(model, <patch>=value)`` arguments into patch configs.

Every patch argument takes the same forms: ``None`` (keep the current setting), ``False`` (off), ``True`` (on with
defaults), a dict of options, or the patch's config dataclass. Each patch's resolver handles ``None``, ``False``
and the dataclass itself (they need the current setting and the model), and calls :func:`argument_options` for the
rest, so the accepted forms and the error messages are the same for every patch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from ..errors import HFKanConfigError


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


__all__ = ["argument_options", "check_option_names"]
