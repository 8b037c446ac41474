"""Module attributes imported on first access (PEP 562), for packages whose ``__init__`` must stay light."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(module: str, attributes: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``module``: ``attributes`` maps a public name to the submodule defining it
    (relative, such as ``".model"``); the first access imports it and caches the value in the module's globals."""

    def __getattr__(name: str) -> Any:
        if name not in attributes:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(attributes[name], module), name)
        vars(sys.modules[module])[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[module])) | set(attributes))

    return __getattr__, __dir__
