"""Inputs the patches cannot read exactly end in a clear error or warning, and what a decode step reuses (the parsed
config, the token table's buffer, no decoder-layer hooks when no patch needs them)."""

import copy
import gc
import inspect

import pytest
import torch
import vlm_models as V
from hf_kan.patches.engine.hooks import model_hook
from hf_kan.patches.mma import runtime as mma_runtime
from transformers.testing_utils import CaptureLogger

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError, InputLayoutError

MMA = {"assistant_token_ids": [V.ASSISTANT]}
PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]


def test_mma_warns_once_when_no_assistant_opener_follows_an_image():
    model = V.shared("llava", "hf_kan")
    P.apply(model, mma=MMA)
    no_opener = V.make_inputs("llava", [V.standard_prompt(1)[:-1]])
    mma_runtime.logger.warning_once.cache_clear()
    with CaptureLogger(mma_runtime.logger) as log, torch.no_grad():
        for _ in range(2):
            out = model(**no_opener)
    assert log.out.count("no assistant-turn opener") == 1 and not out.hf_kan_state.widened
    with CaptureLogger(mma_runtime.logger) as log, torch.no_grad():
        model(**V.make_inputs("llava", PROMPTS))
    assert "opener" not in log.out


@pytest.mark.parametrize("family", V.FAMILIES)
def test_image_tokens_without_image_inputs_raise(family):
    model = V.shared(family, "hf_kan")
    P.apply(model, mma=MMA)
    inputs = V.make_inputs(family, PROMPTS)
    text_only = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    with pytest.raises(InputLayoutError, match="placeholder tokens"), torch.no_grad():
        model(**text_only)


def test_llava_next_image_size_with_a_zero_side_raises():
    model = V.shared("llava_next", "hf_kan")
    P.apply(model, mma=MMA)
    inputs = V.make_inputs("llava_next", PROMPTS)
    inputs["image_sizes"] = inputs["image_sizes"].clone()
    inputs["image_sizes"][1] = torch.tensor([30, 0])
    with pytest.raises(InputLayoutError, match=r"image_sizes\[1\].*sides > 0"), torch.no_grad():
        model(**inputs)


def test_mma_ids_outside_the_vocabulary_are_refused():
    model = V.shared("llava", "hf_kan")
    with pytest.raises(HFKanConfigError, match="vocabulary"):
        P.apply(model, mma={"assistant_token_ids": [V.VOCAB]})


def test_a_decode_step_reuses_the_parsed_config_and_the_token_table():
    model = V.shared("llava", "hf_kan")
    P.apply(model, mma=MMA, var=False, prune=False, dyvte=False)
    hook = model_hook(model)
    inputs = V.make_inputs("llava", PROMPTS)
    with torch.no_grad():
        out = model(**inputs)
        config = hook.config(model)
        ledger = out.cache.ledger
        buffer, mask, token = ledger._buffer, inputs["attention_mask"], out.logits[:, -1:].argmax(-1)
        layouts = [out.hf_kan_state.layout]
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, cache=out.cache)
            token = out.logits[:, -1:].argmax(-1)
            layouts.append(out.hf_kan_state.layout)
            assert hook.config(model) is config and ledger._buffer is buffer  # nothing re-parsed or re-allocated
            # MMA needs no per-layer hook: the decoder layers run without any
            assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)
    for field in ("modality", "position", "image_index", "grid", "row", "col", "newline", "span_end"):
        assert torch.equal(getattr(ledger.tokens, field), torch.cat([getattr(lay, field) for lay in layouts], 1))
    # an edited stored section is parsed (and checked) again
    model.config.text_config.hf_kan["mma"]["assistant_token_ids"] = [V.ASSISTANT, V.USER]
    assert hook.config(model).mma.assistant_token_ids == (V.ASSISTANT, V.USER)
    P.apply(model, mma=MMA)


def test_the_generate_guard_survives_copies_and_leaves_with_detach():
    model = V.build("llava", "sdpa")
    P.apply(model, mma=MMA, var={"sink_dims": [3], "layers": [1]})  # VAR: the layer hooks get installed
    assert "generation_config" in inspect.signature(model.generate).parameters
    inputs = V.make_inputs("llava", PROMPTS)
    with torch.no_grad():
        model(**inputs)

    def models():
        return sum(type(o) is type(model) for o in gc.get_objects())

    before = models()
    twin = copy.deepcopy(model)
    assert models() == before + 1  # the hooks hold no (weak) reference that would copy the model a second time
    greedy = dict(max_new_tokens=2, do_sample=False, suppress_tokens=V.SUPPRESS)
    assert torch.equal(twin.generate(**inputs, **greedy), model.generate(**inputs, **greedy))
    assert twin.__dict__["generate"]._model() is twin
    with pytest.raises(InputLayoutError, match="prefill_chunk_size=3"):
        twin.generate(**inputs, prefill_chunk_size=3, **greedy)
    P.detach(model)
    assert "generate" not in model.__dict__
