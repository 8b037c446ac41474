"""What a patch declares (``PatchSpec``) and the table of registered patches.

A patch is one ``PatchSpec``: its name (the ``apply`` keyword and the key of its ``hf_kan`` config section), its
validated config dataclass, its ``PatchRuntime`` subclass, how ``apply`` resolves its argument, optional extra
modules to attach to the model, whether it changes which keys a query may see, and the command-line subcommands it
contributes. ``PatchConfig`` (de)serialisation, ``apply``, ``status``, the runtimes of a forward and the CLI are all
derived from the table, in registration order.

The engine owns the table but never imports a patch: ``hf_kan.patches.registry`` registers the built-in ones (one
line each), and anyone can register another with :func:`register` (``unregister`` removes it). Registering is
idempotent for an identical spec, like Transformers' own registries.
"""

from __future__ import annotations

import dataclasses
import json
import keyword
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from ...errors import HFKanConfigError
from .options import ApplyContext, argument_options, parse_options
from .runtime import PatchRuntime


class CliCommand(NamedTuple):
    """A ``hf-kan`` subcommand a patch contributes: its name, the module whose ``add_subparser(subparsers)`` adds it
    (imported only when the command line is built), and its one-line help."""

    name: str
    module: str
    help: str


#: ``resolve(value, current, context) -> config | None``: turn an ``apply`` argument (``None``, ``True``, a dict, a
#: config instance or a patch-specific form; never ``False``) into the patch's config, given the current one.
Resolver = Callable[[Any, Any, ApplyContext], Any]


@dataclass(frozen=True)
class PatchSpec:
    """Declaration of one patch (see the module docstring).

    Args:
        name: the ``apply`` keyword and ``hf_kan`` config key (a Python identifier).
        config_class: a dataclass validated in ``__post_init__``; stored as ``to_dict()`` if it defines one, else
            ``dataclasses.asdict``, and rebuilt as ``config_class(**stored)``.
        runtime_class: instantiated as ``runtime_class(config)`` for every forward in which the patch is on.
        resolve: how ``apply`` turns its argument into a config (default: ``None`` keeps the current one, ``True``
            or a dict of options builds one, a ``config_class`` instance is used as it is).
        attach: ``attach(model, config)``, called by ``apply`` while the patch is on, to add or restore extra modules
            the patch needs on the model (DyVTE's routers).
        changes_visibility: the patch changes which keys a query may see (MMA), which FlashAttention-2 cannot
            express; ``apply`` refuses such patches on it.
        cli: the ``hf-kan`` subcommands the patch contributes.
    """

    name: str
    config_class: type
    runtime_class: type[PatchRuntime]
    resolve: Resolver | None = None
    attach: Callable[[nn.Module, Any], Any] | None = None
    changes_visibility: bool = False
    cli: tuple[CliCommand, ...] = ()

    def __post_init__(self):
        if not self.name.isidentifier() or keyword.iskeyword(self.name) or self.name.startswith("_"):
            raise HFKanConfigError(f"a patch name must be a public Python identifier, got {self.name!r}")
        if self.name in _RESERVED:
            raise HFKanConfigError(f"{self.name!r} is reserved (an apply() argument or a PatchConfig attribute)")
        if not dataclasses.is_dataclass(self.config_class):
            raise HFKanConfigError(f"patch {self.name!r}: config_class must be a dataclass, got {self.config_class!r}")
        if not (isinstance(self.runtime_class, type) and issubclass(self.runtime_class, PatchRuntime)):
            raise HFKanConfigError(f"patch {self.name!r}: runtime_class must subclass PatchRuntime")
        object.__setattr__(self, "cli", tuple(CliCommand(*c) for c in self.cli))

    def resolve_argument(self, value: Any, current: Any, context: ApplyContext) -> Any:
        """The config ``apply(model, <name>=value)`` leads to (``None`` = off), given the ``current`` one."""
        if value is False:
            return None
        if self.resolve is not None:
            return self.resolve(value, current, context)
        if value is None:
            return current
        if isinstance(value, self.config_class):
            return value
        return parse_options(self.name, self.config_class, argument_options(self.name, value, self.config_class))

    def config_to_dict(self, config: Any) -> dict[str, Any]:
        """The stored form of one of this patch's configs: ``to_dict()`` (or ``dataclasses.asdict``) as plain JSON
        values (tuples become lists), so what ``save_pretrained`` writes is what a loaded model reads."""
        to_dict = getattr(config, "to_dict", None)
        data = to_dict() if callable(to_dict) else dataclasses.asdict(config)
        try:
            return json.loads(json.dumps(data))
        except (TypeError, ValueError) as e:
            raise HFKanConfigError(f"the {self.name} config does not serialise to JSON ({e}); give "
                                   f"{type(config).__name__} a to_dict() of plain values") from None


#: names a patch may not take: ``apply``'s own keywords, the ``version`` key and ``PatchConfig``'s attributes
_RESERVED = frozenset({"model", "processor", "tokenizer", "version", "active", "changes_mask", "items", "get",
                       "replace", "to_dict", "from_dict"})

_TABLE: dict[str, PatchSpec] = {}


def register(spec: PatchSpec, *, exist_ok: bool = False) -> PatchSpec:
    """Add ``spec`` to the table (after the patches registered before it). Registering an identical spec again is a
    no-op; a different spec under a taken name raises unless ``exist_ok`` (then it replaces the old one in place)."""
    old = _TABLE.get(spec.name)
    if old is not None and old != spec and not exist_ok:
        raise HFKanConfigError(f"a different patch named {spec.name!r} is already registered")
    _TABLE[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove the patch ``name`` from the table (``KeyError`` if it is not registered)."""
    del _TABLE[name]


def specs() -> tuple[PatchSpec, ...]:
    """The registered patches, in registration order."""
    return tuple(_TABLE.values())


def names() -> tuple[str, ...]:
    """The registered patch names, in registration order."""
    return tuple(_TABLE)


def spec_for(name: str) -> PatchSpec:
    """The spec of patch ``name``, or ``HFKanConfigError`` listing the registered ones."""
    spec = _TABLE.get(name)
    if spec is None:
        raise HFKanConfigError(f"unknown patch {name!r}; this hf-kan knows {sorted(_TABLE)}")
    return spec


def is_registered(name: str) -> bool:
    return name in _TABLE


def cli_commands() -> tuple[CliCommand, ...]:
    """The ``hf-kan`` subcommands of the registered patches (name, module, one-line help), in registration order;
    nothing is imported to list them."""
    return tuple(command for spec in _TABLE.values() for command in spec.cli)


def cli_help(command: str) -> str:
    """The one-line help a registered patch declares for its subcommand ``command`` (what ``add_subparser`` shows)."""
    for c in cli_commands():
        if c.name == command:
            return c.help
    raise KeyError(f"no registered patch contributes the command {command!r}")


def runtimes_for(config) -> list[PatchRuntime]:
    """Fresh runtimes of the active patches of a ``PatchConfig``, in registration order (one set per forward)."""
    return [spec_for(name).runtime_class(sub) for name, sub in config.items()]


__all__ = ["CliCommand", "PatchSpec", "Resolver", "cli_commands", "cli_help", "is_registered", "names", "register",
           "runtimes_for", "spec_for", "specs", "unregister"]
