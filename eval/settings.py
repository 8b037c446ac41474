"""Patch settings of an evaluation: which hf-kan patches are on, and with which options.

A :class:`PatchSetting` names one configuration of the four patches (``mma``, ``var``, ``prune``, ``dyvte``); each
field takes what ``hf_kan.patches.apply`` takes for that patch (``None`` = as saved in the checkpoint, ``False`` =
off, ``True`` = on with defaults, a preset name such as ``"fastv"``, or a dict of options). Settings are written on
command lines and in lmms-eval ``--model_args`` as ``key=value`` pairs:

    off                                   every patch off
    checkpoint                            the patches as saved in the checkpoint's config
    prune=fastv                           FastV with its defaults, the other patches as saved
    prune={"method":"fastv","keep_ratios":[0.25]},mma=false

A value is ``true`` / ``false`` / ``none``, a JSON object or list, or a bare word (a preset name). Commas inside
braces or brackets do not split pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import HFKanConfigError

PATCH_NAMES = ("mma", "var", "prune", "dyvte")


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


@dataclass(frozen=True)
class PatchSetting:
    """One patch configuration to evaluate; ``name`` labels it in result tables.

    Each patch field is passed to ``hf_kan.patches.apply`` as is, except ``None``, which restores the value saved in
    the checkpoint (so settings evaluated one after another on the same loaded model do not leak into each other).
    """

    name: str = "checkpoint"
    mma: Any = None
    var: Any = None
    prune: Any = None
    dyvte: Any = None
    extra: dict = field(default_factory=dict, compare=False)
    """free-form notes carried into the results (e.g. the command-line text the setting came from)"""

    @classmethod
    def off(cls, name: str = "off") -> PatchSetting:
        """Every patch off."""
        return cls(name=name, mma=False, var=False, prune=False, dyvte=False)

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
            if not sep or key not in PATCH_NAMES:
                raise HFKanConfigError(
                    f"cannot read patch setting {text!r}: expected 'off', 'checkpoint' or comma-separated "
                    f"key=value pairs with keys in {list(PATCH_NAMES)} (e.g. 'prune=fastv,mma=false')"
                )
            values[key] = parse_patch_value(key, value)
        return cls(name=name or stripped, extra={"text": stripped}, **values)

    def patch_arguments(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for ``hf_kan.patches.apply``: this setting's values, ``None`` replaced by the
        checkpoint's saved value of that patch (``saved`` as in ``patches.status(model)["patches"]``) or ``False``."""
        out = {}
        for key in PATCH_NAMES:
            value = getattr(self, key)
            out[key] = (saved.get(key) or False) if value is None else value
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: getattr(self, k) for k in PATCH_NAMES}}


__all__ = ["PATCH_NAMES", "PatchSetting", "parse_patch_value", "split_pairs"]
