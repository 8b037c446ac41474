"""The word-level tokenizer and the ``LlavaProcessor`` of the Shapes VQA vision-language model.

The tokenizer is a ``tokenizers`` ``WordLevel`` model over every word the data set uses (questions, answers,
role markers), split on whitespace, saved as a ``PreTrainedTokenizerFast``; ``<image>`` is a special token, so
the processor's expansion ``<image><image>...`` splits into one id per image token. Its chat template writes a
LLaVA-1.5-style prompt::

    <s>USER: <image> what colour is the circle ? ASSISTANT: red </s>

and ``add_generation_prompt=True`` appends ``ASSISTANT:``: that single token is the assistant-turn opener that
``hf_kan.patches.apply(model, mma=True, processor=...)`` derives from the template.

The processor is a stock ``LlavaProcessor`` with the KAT image processor (``crop_pct=1.0``: the published
``0.875`` crop would cut the border rows of the synthetic scenes; images are already ``image_size`` px, so the
resize keeps them as they are), ``num_additional_image_tokens=1`` (the tower's class token, dropped by the
``"default"`` feature selection) and ``crop_size`` recorded so ``processor._get_num_multimodal_tokens`` (what
serving engines call) works. ``AutoProcessor.from_pretrained(directory)`` loads it after ``save_pretrained``.
"""

from __future__ import annotations

from typing import Any

from ..data.shapes_vqa import ANSWERS, COLOURS, COLUMNS, NUMBERS, RELATIONS, ROWS, SHAPES
from ..errors import HFKanConfigError

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)
USER_TOKEN, ASSISTANT_TOKEN = "USER:", "ASSISTANT:"
# words of the question templates in hf_kan.data.shapes_vqa (besides the names below)
_QUESTION_WORDS = ("what", "colour", "is", "the", "?", "shape", "at", "there", "a", "how", "many", "shapes", "are",
                   "nothing")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %} </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def shapes_vqa_vocabulary() -> list[str]:
    """Every token of the Shapes VQA tokenizer, in id order: special tokens, role markers, then the words of the
    questions and answers (each once, in a fixed order)."""
    words = [*SPECIAL_TOKENS, USER_TOKEN, ASSISTANT_TOKEN, *_QUESTION_WORDS, *SHAPES, *COLOURS, *ROWS, *COLUMNS,
             *NUMBERS, *(w for relation in RELATIONS for w in relation.split())]
    for answers in ANSWERS.values():
        words += answers
    return list(dict.fromkeys(words))  # duplicates would give ids >= len(tokenizer)


def build_tokenizer() -> Any:
    """The word-level ``PreTrainedTokenizerFast`` (see the module docstring), with the chat template set."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(shapes_vqa_vocabulary())}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(image_size: int = 48, patch_size: int = 8, tokenizer: Any | None = None) -> Any:
    """A ``LlavaProcessor`` with the KAT image processor at ``image_size`` px and the tokenizer of
    :func:`build_tokenizer`; an image becomes ``(image_size // patch_size) ** 2`` image tokens."""
    from transformers import LlavaProcessor

    from ..models.kat import kat_image_processor

    if image_size % patch_size:
        raise HFKanConfigError(f"patch_size={patch_size} must divide image_size={image_size}")
    image_processor = kat_image_processor(image_size, crop_pct=1.0)
    image_processor.crop_size = {"height": image_size, "width": image_size}
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def user_turn(question: str) -> list[dict[str, Any]]:
    """The one-turn conversation ``[{"role": "user", "content": [image, question]}]`` the model is trained on."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def prompt_text(processor: Any, question: str) -> str:
    """The prompt for ``question`` up to and including the assistant-turn opener (``... ASSISTANT:``)."""
    return processor.apply_chat_template(user_turn(question), add_generation_prompt=True)


__all__ = [
    "ASSISTANT_TOKEN",
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "USER_TOKEN",
    "build_processor",
    "build_tokenizer",
    "prompt_text",
    "shapes_vqa_vocabulary",
    "user_turn",
]
