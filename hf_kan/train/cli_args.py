"""Build ``argparse`` options from an arguments dataclass, so the dataclass is the single source of defaults.

Each field becomes ``--field-name`` with the field's default and its ``metadata["help"]``.
Booleans become ``--flag`` / ``--no-flag`` (or a plain ``--flag`` switch with ``negatable_bools=False``);
``dict`` fields take ``KEY=VALUE[,KEY=VALUE...]``
(values parsed as JSON where possible, e.g. ``hidden_size=96,qkv_bias=false``) or a JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

from ..errors import HFKanConfigError


def parse_key_values(text: str) -> dict[str, Any]:
    """Parse ``"a=1,b=x"`` (values as JSON when they parse, else strings) or a JSON object into a dict."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise HFKanConfigError(f"could not parse {text!r} as a JSON object: {err}") from err
        if not isinstance(value, dict):
            raise HFKanConfigError(f"expected a JSON object, got {text!r}")
        return value
    result: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise HFKanConfigError(f"expected KEY=VALUE pairs separated by commas, got {item!r} in {text!r}")
        try:
            result[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            result[key.strip()] = raw
    return result


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; ``dict[str, Any]`` -> ``dict``; plain types unchanged."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return origin or annotation


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, negatable_bools: bool = True) -> None:
    """Add one option per field of dataclass ``cls`` to ``parser`` (dest = field name).

    Help texts end with the default (unless it is ``None``: the help says what unset means).
    ``negatable_bools=False`` makes boolean fields ``store_true`` switches (no ``--no-flag``)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        base = _base_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        shown = help_text if default is None else f"{help_text} (default: {default})"  # None: the help says it
        if base is bool and not negatable_bools:
            parser.add_argument(flag, dest=field.name, action="store_true", default=default, help=shown)
        elif base is bool:
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif base is dict:
            parser.add_argument(
                flag, dest=field.name, type=parse_key_values, default=default, help=help_text, metavar="K=V,..."
            )
        else:
            parser.add_argument(flag, dest=field.name, type=base, default=default, help=shown)


def dataclass_from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """Instantiate dataclass ``cls`` from the options :func:`add_dataclass_arguments` added."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


__all__ = ["add_dataclass_arguments", "dataclass_from_namespace", "parse_key_values"]
