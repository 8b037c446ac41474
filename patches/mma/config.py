"""Configuration of modality-mutual attention (MMA, AKI): ``MMAConfig`` and how ``apply(model, mma=...)`` resolves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import HFKanConfigError
from ..engine.options import ApplyContext, argument_options, parse_options
from .chat_template import assistant_opener_ids

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


def resolve_mma(value, current: MMAConfig | None, context: ApplyContext) -> MMAConfig | None:
    """``apply(model, mma=...)``: ``None`` keeps ``current``; ``True`` / a dict / an ``MMAConfig`` turns MMA on.
    Without ``assistant_token_ids`` they are derived from the chat template of ``processor=`` / ``tokenizer=`` (or
    kept from ``current``); ids outside the model's vocabulary are refused."""
    if value is None:
        return current
    if isinstance(value, MMAConfig):
        cfg = value
    else:
        value = argument_options("mma", value, MMAConfig)
        if "assistant_token_ids" not in value:
            if context.template_source is not None:
                value["assistant_token_ids"] = assistant_opener_ids(context.template_source)
            elif current is not None:
                value["assistant_token_ids"] = current.assistant_token_ids
            else:
                raise HFKanConfigError(
                    "MMA needs the token ids that open the assistant turn: pass processor=... (or tokenizer=...) so "
                    "they are derived from its chat template, or mma={'assistant_token_ids': [...]}"
                )
        cfg = parse_options("mma", MMAConfig, value)
    vocab_size = context.vocab_size
    if vocab_size is not None and any(i >= vocab_size for i in cfg.assistant_token_ids):
        raise HFKanConfigError(
            f"mma.assistant_token_ids {list(cfg.assistant_token_ids)} contains ids outside the vocabulary "
            f"(size {vocab_size}); were they made by another model's tokenizer?"
        )
    return cfg


__all__ = ["MMAConfig", "resolve_mma"]
