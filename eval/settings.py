"""Patch settings of an evaluation: which hf-kan patches are on, and with which options.

A :class:`PatchSetting` names one configuration of the registered patches (:func:`patch_names`, i.e.
``hf_kan.patches.registry.names()``: ``mma``, ``var``, ``prune``, ``dyvte`` and any patch registered with
``hf_kan.patches.registry.register``); each takes what ``hf_kan.patches.apply`` takes for that patch (``None`` = as
saved in the checkpoint, ``False`` = off, ``True`` = on with defaults, a preset name such as ``"fastv"``, or a dict of
options). Settings are written on command lines and in lmms-eval ``--model_args`` as ``key=value`` pairs:

    off                                   every patch off
    checkpoint                            the patches as saved in the checkpoint's config
    prune=fastv                           FastV with its defaults, the other patches as saved
    prune={"method":"fastv","keep_ratios":[0.25]},mma=false

A value is ``true`` / ``false`` / ``none``, a JSON object or list, or a bare word (a preset name). Commas inside
braces or brackets do not split pairs.

Importing this module stays cheap (no torch, no Transformers): the patch registry, which imports the patches, is read
only when a setting needs the names (parsing pairs, :meth:`PatchSetting.off`, :meth:`PatchSetting.patch_arguments`).
``PATCH_NAMES`` is kept as a module attribute computed on access.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import HFKanConfigError


def patch_names() -> tuple[str, ...]:
    """Names of the registered patches in the order their runtimes run (``hf_kan.patches.registry.names()``)."""
    from ..patches.registry import names

    return names()


def __getattr__(name: str) -> Any:
    if name == "PATCH_NAMES":  # read from the registry on access, so that importing this module stays cheap
        return patch_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_patch_value(name: str, value: Any) -> Any:
    """One patch argument from its command-line / ``model_args`` form (see the module docstring).

    Booleans, ``None``, dicts and other non-string values are returned unchanged; strings are read as
    ``true``/``false``/``none`` (any case), JSON when they start with ``{`` or ``[``, else kept as a preset name.
    """
    if not isinstance(value, str):
        return value
    text = value.strip().strip("'\"").strip()
    lowered = text.lower()
    if lowered in ("true", "on", "yes", "1"):
        return True
    if lowered in ("false", "off", "no", "0"):
        return False
    if lowered in ("none", "null", ""):
        return None
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise HFKanConfigError(f"{name}={text!r} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    return text


def split_pairs(text: str) -> list[str]:
    """Split ``a=1,b={"x":[1,2]}`` on the commas that are outside braces, brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


@dataclass(frozen=True, init=False)
class PatchSetting:
    """One patch configuration to evaluate; ``name`` labels it in result tables.

    ``PatchSetting(name, prune="fastv", mma=False)``: one keyword per registered patch (:func:`patch_names`), or
    ``patches={...}`` (for a patch whose name is taken by an argument here), read back from ``setting.patches`` or as
    attributes (``setting.prune``; ``None`` for a patch not given). Each value is passed to
    ``hf_kan.patches.apply`` as is, except ``None``, which restores the value saved in the checkpoint (so settings
    evaluated one after another on the same loaded model do not leak into each other).
    """

    name: str
    patches: dict
    """patch name -> its ``apply`` argument, for the patches given a value other than ``None``"""
    extra: dict = field(compare=False)
    """free-form notes carried into the results (e.g. the command-line text the setting came from)"""

    def __init__(self, name: str = "checkpoint", extra: dict | None = None, patches: dict[str, Any] | None = None,
                 **more_patches: Any) -> None:
        patches = {**(patches or {}), **more_patches}
        given = {key: value for key, value in patches.items() if value is not None}
        if patches:
            unknown = sorted(set(patches) - set(patch_names()))
            if unknown:
                raise HFKanConfigError(
                    f"unknown patches {unknown} in a patch setting; the registered ones are {list(patch_names())}"
                )
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "patches", given)
        object.__setattr__(self, "extra", dict(extra or {}))

    def __getattr__(self, key: str) -> Any:
        # only reached for names that are not fields: a registered patch's value, else the usual AttributeError
        if not key.startswith("_") and key in patch_names():
            return self.patches.get(key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    @classmethod
    def off(cls, name: str = "off") -> PatchSetting:
        """Every patch off."""
        return cls(name=name, patches=dict.fromkeys(patch_names(), False))

    @classmethod
    def parse(cls, text: str | PatchSetting, name: str | None = None) -> PatchSetting:
        """A setting from its text form (``"off"``, ``"checkpoint"``, ``"prune=fastv,mma=false"``, ...)."""
        if isinstance(text, PatchSetting):
            return text
        stripped = text.strip()
        if stripped.lower() == "off":
            return cls.off(name or "off")
        if stripped.lower() in ("checkpoint", "saved", ""):
            return cls(name=name or "checkpoint")
        values: dict[str, Any] = {}
        for pair in split_pairs(stripped):
            key, sep, value = pair.partition("=")
            key = key.strip()
            if not sep or key not in patch_names():
                raise HFKanConfigError(
                    f"cannot read patch setting {text!r}: expected 'off', 'checkpoint' or comma-separated "
                    f"key=value pairs with keys in {list(patch_names())} (e.g. 'prune=fastv,mma=false')"
                )
            values[key] = parse_patch_value(key, value)
        return cls(name=name or stripped, extra={"text": stripped}, patches=values)

    def patch_arguments(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for ``hf_kan.patches.apply``, one per registered patch: this setting's value, or where
        it has none the checkpoint's saved value of that patch (``saved`` as in ``patches.status(model)["patches"]``)
        or ``False``."""
        return {key: self.patches[key] if key in self.patches else (saved.get(key) or False) for key in patch_names()}

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{key: self.patches.get(key) for key in patch_names()}}


__all__ = ["PatchSetting", "parse_patch_value", "patch_names", "split_pairs"]  # and PATCH_NAMES, on access
