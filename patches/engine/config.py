"""The patch configuration stored as the ``hf_kan`` section of a model's (text) config.

``PatchConfig`` holds one sub-config per active patch, keyed by the patch's registered name (``engine.spec``); a
patch that is absent is off. It round-trips through a plain JSON-serialisable dict (``to_dict`` / ``from_dict``),
which is what lives in ``config.text_config.hf_kan`` (or ``config.hf_kan`` for a model without a text sub-config)
and is written by ``save_pretrained``:

    {"version": 1, "mma": {"assistant_token_ids": [4], "modalities": ["image", "video"]}}

Nothing here names a patch: the registered ``PatchSpec``s say which sections exist and how they parse.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...errors import HFKanConfigError
from .options import parse_options
from .spec import is_registered, names, spec_for

CONFIG_ATTRIBUTE = "hf_kan"
FORMAT_VERSION = 1


class PatchConfig:
    """All patches of one model: ``PatchConfig(mma=MMAConfig(...), prune=PruneConfig())``. ``config.<name>`` is a
    registered patch's config, ``None`` when it is off; every patch off behaves exactly like ``sdpa``. Immutable:
    ``replace`` returns a changed copy."""

    def __init__(self, **patches: Any):
        for name, sub in patches.items():
            spec = spec_for(name)
            if sub is not None and not isinstance(sub, spec.config_class):
                raise HFKanConfigError(
                    f"PatchConfig({name}=...) needs a {spec.config_class.__name__} or None, got {type(sub).__name__}; "
                    "use PatchConfig.from_dict for stored dicts"
                )
        ordered = {name: patches[name] for name in names() if patches.get(name) is not None}
        object.__setattr__(self, "_patches", ordered)

    # --- access --------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        patches = self.__dict__.get("_patches", {})
        if name in patches:
            return patches[name]
        if is_registered(name):
            return None
        raise AttributeError(f"PatchConfig has no patch {name!r}; registered patches: {list(names())}")

    def get(self, name: str) -> Any:
        """The config of patch ``name`` (``None`` when off)."""
        return self._patches.get(name)

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(name, config)`` of the active patches, in registration order."""
        return iter(tuple(self._patches.items()))

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the patches that are on, in registration order."""
        return tuple(self._patches)

    @property
    def changes_mask(self) -> bool:
        """Whether some active patch changes which keys a query may see (``PatchSpec.changes_visibility``; these
        cannot run on FlashAttention-2)."""
        return any(spec_for(name).changes_visibility for name in self._patches)

    # --- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable form stored in the model config."""
        out: dict[str, Any] = {"version": FORMAT_VERSION}
        for name, sub in self._patches.items():
            out[name] = spec_for(name).config_to_dict(sub)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | PatchConfig | None) -> PatchConfig:
        """Parse and validate a stored ``hf_kan`` section (``None`` or ``{}`` gives every patch off)."""
        if data is None:
            return cls()
        if isinstance(data, PatchConfig):
            return data
        if not isinstance(data, dict):
            raise HFKanConfigError(f"the hf_kan config section must be a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise HFKanConfigError(
                f"hf_kan config format version {version} is not supported by this hf-kan (expects {FORMAT_VERSION}); "
                "upgrade hf-kan or re-apply the patches"
            )
        unknown = sorted(set(data) - set(names()))
        if unknown:
            raise HFKanConfigError(
                f"unknown patch(es) {unknown} in the hf_kan config; this hf-kan knows {sorted(names())}"
            )
        parsed = {}
        for name in names():
            if name in data:
                parsed[name] = parse_options(name, spec_for(name).config_class, data[name])
        return cls(**parsed)

    def resolved(self, context) -> PatchConfig:
        """This config with every active patch's config passed through its spec's resolver for ``context``'s model
        (an ``ApplyContext``): the model-dependent checks ``apply`` makes on its arguments (vocabulary, hidden size,
        layer count) applied to stored values, so a saved section is trusted no more than an argument. Resolvers may
        also make model defaults explicit (VAR's layers)."""
        return type(self)(**{name: spec_for(name).resolve_argument(sub, None, context)
                             for name, sub in self._patches.items()})

    def replace(self, **changes: Any) -> PatchConfig:
        """A copy with the given patches' configs replaced (``None`` turns one off)."""
        return type(self)(**{**self._patches, **changes})

    # --- value semantics -----------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("PatchConfig is immutable; use replace(...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatchConfig) and self._patches == other._patches

    def __hash__(self) -> int:
        return hash(tuple(self._patches.items()))

    def __repr__(self) -> str:
        return f"PatchConfig({', '.join(f'{k}={v!r}' for k, v in self._patches.items())})"

    def __getstate__(self) -> dict[str, Any]:
        return {"_patches": self._patches}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "_patches", dict(state["_patches"]))


__all__ = ["CONFIG_ATTRIBUTE", "FORMAT_VERSION", "PatchConfig"]
