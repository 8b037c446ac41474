"""The assistant-turn opener, derived from a tokenizer's or processor's chat template.

The opener is what ``add_generation_prompt=True`` appends to a conversation: render a one-message user turn with and
without it, tokenize both, and take the token ids that the first one adds after the common prefix. For LLaVA-1.5
templates this is ``"ASSISTANT:"``; for Qwen ``"<|im_start|>assistant\\n"``.
"""

from __future__ import annotations

from ...errors import HFKanConfigError

_PROBE = "Describe the picture."


def _render(obj, add_generation_prompt: bool) -> str:
    last_error = None
    for content in (_PROBE, [{"type": "text", "text": _PROBE}]):
        try:
            return obj.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
        except Exception as e:  # templates differ in the content format they accept; try the other one
            last_error = e
    raise HFKanConfigError(
        f"could not render the chat template of {type(obj).__name__} ({last_error}); pass "
        "mma={'assistant_token_ids': [...]} explicitly"
    )


def assistant_opener_ids(tokenizer_or_processor) -> tuple[int, ...]:
    """Token ids that open the assistant turn in ``tokenizer_or_processor``'s chat template."""
    obj = tokenizer_or_processor
    tokenizer = getattr(obj, "tokenizer", obj)
    if not getattr(obj, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
        raise HFKanConfigError(
            f"{type(obj).__name__} has no chat template; pass mma={{'assistant_token_ids': [...]}} with the ids of the "
            "text that opens the assistant turn"
        )
    if not getattr(obj, "chat_template", None):
        obj = tokenizer
    without = tokenizer(_render(obj, False), add_special_tokens=False)["input_ids"]
    with_prompt = tokenizer(_render(obj, True), add_special_tokens=False)["input_ids"]
    common = 0
    while common < min(len(without), len(with_prompt)) and without[common] == with_prompt[common]:
        common += 1
    opener = tuple(int(i) for i in with_prompt[common:])
    if not opener:
        raise HFKanConfigError(
            "the chat template adds nothing for add_generation_prompt=True, so the assistant-turn opener cannot be "
            "derived; pass mma={'assistant_token_ids': [...]} explicitly"
        )
    return opener


__all__ = ["assistant_opener_ids"]
