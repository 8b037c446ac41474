"""A tiny random LLaVA saved as a complete checkpoint directory: model, word-level tokenizer with a chat template,
and ``LlavaProcessor`` (CLIP image processor), so ``AutoModelForImageTextToText`` / ``AutoProcessor`` load it offline.

Shared by the evaluation tests (runner, lmms-eval plugin) and the Hub upload tests. The vocabulary is small and made
mostly of the digit words, so the random model's greedy answers to "what digit is this ?" are often digits: its
accuracy on the digits smoke task is near chance, not zero, which makes "runner accuracy == lmms-eval accuracy" a
test with teeth.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]
WORDS = [str(d) for d in range(10)] + ["what", "digit", "is", "this", "?"]
IMAGE_SIZE, PATCH_SIZE = 16, 4
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # num_additional_image_tokens=1: the CLIP class token, which the "default" feature selection drops again
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer(), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def model(num_layers: int = 4, seed: int = 1):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = tokenizer()
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_token_id=tok.convert_tokens_to_ids("<image>"),
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration._from_config(config)
    with torch.no_grad():  # sharper attention than the near-uniform random init, so pruning visibly matters
        for name, p in llava.named_parameters():
            if "language_model" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                p.mul_(4.0)
    return llava.eval()


def save(directory: str | Path, num_layers: int = 4, seed: int = 1) -> Path:
    """Write the tiny LLaVA, its tokenizer and processor to ``directory``; returns it as a ``Path``."""
    directory = Path(directory)
    model(num_layers, seed).save_pretrained(directory)
    processor().save_pretrained(directory)
    return directory
