"""The patch configuration stored as the ``hf_kan`` section of a model's (text) config.

``PatchConfig`` holds one optional sub-config per patch; ``None`` means the patch is off. It round-trips through a
plain JSON-serialisable dict (``to_dict`` / ``from_dict``), which is what lives in ``config.text_config.hf_kan`` (or
``config.hf_kan`` for a model without a text sub-config) and is written by ``save_pretrained``.

Extension point: a new patch (VAR, pruning, DyVTE) adds its own validated dataclass here, one field on
``PatchConfig`` and one entry in ``_PATCH_CLASSES``; nothing else in the serialisation changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import HFKanConfigError
from .arguments import check_option_names
from .dyvte_config import DyVTEConfig
from .pruning_config import PruneConfig
from .var_config import VARConfig

CONFIG_ATTRIBUTE = "hf_kan"
FORMAT_VERSION = 1
_MODALITIES = ("image", "video")


@dataclass(frozen=True)
class MMAConfig:
    """Modality-mutual attention (AKI): image tokens also attend to the prompt text that follows them.

    Args:
        assistant_token_ids: the token-id sequence that opens the assistant turn (for example the ids of
            ``"ASSISTANT:"`` for LLaVA-1.5 or ``"<|im_start|>assistant\\n"`` for Qwen). A visual token may see the
            text after its image up to and including the last token of the first occurrence of this sequence after
            the image. ``apply(model, mma=True, processor=...)`` derives it from the chat template.
        modalities: which visual modalities get the extra visibility (``"image"``, ``"video"``).
    """

    assistant_token_ids: tuple[int, ...]
    modalities: tuple[str, ...] = ("image", "video")

    def __post_init__(self):
        ids = self.assistant_token_ids
        if isinstance(ids, int) or not hasattr(ids, "__iter__"):
            raise HFKanConfigError(
                f"mma.assistant_token_ids must be a sequence of token ids, got {ids!r}; pass e.g. [319, 1799, 9047, 13]"
            )
        ids = tuple(ids)
        if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
            raise HFKanConfigError(
                f"mma.assistant_token_ids must be a non-empty list of non-negative ints, got {list(ids)!r}"
            )
        mods = (self.modalities,) if isinstance(self.modalities, str) else tuple(self.modalities)
        if not mods or any(m not in _MODALITIES for m in mods):
            raise HFKanConfigError(f"mma.modalities must be a non-empty subset of {_MODALITIES}, got {mods!r}")
        object.__setattr__(self, "assistant_token_ids", ids)
        object.__setattr__(self, "modalities", mods)

    def to_dict(self) -> dict[str, Any]:
        return {"assistant_token_ids": list(self.assistant_token_ids), "modalities": list(self.modalities)}


_PATCH_CLASSES: dict[str, type] = {"mma": MMAConfig, "var": VARConfig, "prune": PruneConfig, "dyvte": DyVTEConfig}


@dataclass(frozen=True)
class PatchConfig:
    """All patches of one model. A field set to ``None`` is off; every patch off behaves exactly like ``sdpa``."""

    mma: MMAConfig | None = None
    var: VARConfig | None = None
    prune: PruneConfig | None = None
    dyvte: DyVTEConfig | None = None

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the patches that are on."""
        return tuple(name for name in _PATCH_CLASSES if getattr(self, name) is not None)

    @property
    def changes_mask(self) -> bool:
        """Whether some active patch changes which keys a query may see (these cannot run on FlashAttention-2)."""
        return self.mma is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable form stored in the model config."""
        out: dict[str, Any] = {"version": FORMAT_VERSION}
        for name in _PATCH_CLASSES:
            sub = getattr(self, name)
            if sub is not None:
                out[name] = sub.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PatchConfig:
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
        unknown = sorted(set(data) - set(_PATCH_CLASSES))
        if unknown:
            raise HFKanConfigError(
                f"unknown patch(es) {unknown} in the hf_kan config; this hf-kan knows {sorted(_PATCH_CLASSES)}"
            )
        kwargs = {}
        for name, sub_cls in _PATCH_CLASSES.items():
            kwargs[name] = _parse_sub(name, sub_cls, data.get(name))
        return cls(**kwargs)

    def replace(self, **changes) -> PatchConfig:
        return dataclasses.replace(self, **changes)


def _parse_sub(name: str, sub_cls: type, value: Any):
    if value is None or value is False:
        return None
    if isinstance(value, sub_cls):
        return value
    if not isinstance(value, dict):
        raise HFKanConfigError(f"hf_kan.{name} must be a dict of options or null, got {value!r}")
    check_option_names(name, value, sub_cls)
    try:
        return sub_cls(**value)
    except TypeError as e:  # a required option is missing
        raise HFKanConfigError(f"hf_kan.{name}: {e}") from None


__all__ = ["CONFIG_ATTRIBUTE", "MMAConfig", "PatchConfig"]
