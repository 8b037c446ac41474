"""Sliding-window text layers: which layers slide (the config read as Transformers reads it), the window in the masks,
refusals. The invariants (off == sdpa, padded batch, cached conversation, chunked prefill, detach) run on the
sliding-window family variants in ``test_invariants.py``."""

from types import SimpleNamespace

import pytest
import torch
import vlm_models as V
from hf_kan.patches.engine.windows import layer_windows
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import UnsupportedModelError

PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]


def _transformers_windows(config) -> list:
    """Per layer, the window Transformers' own cache gives a sliding layer (``None`` for full attention)."""
    types, kwargs = get_layer_types_and_kwargs(config)
    return [kw.get("sliding_window") if t == "sliding_attention" else None for t, kw in zip(types, kwargs)]


@pytest.mark.parametrize("config", [
    MistralConfig(num_hidden_layers=3, sliding_window=5),  # no layer_types: every layer slides
    MistralConfig(num_hidden_layers=2, sliding_window=None),
    Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    Qwen2Config(num_hidden_layers=2, use_sliding_window=False, sliding_window=4),  # declared but unused
    Gemma2Config(num_hidden_layers=4, sliding_window=7),  # alternating layer_types
], ids=["mistral", "mistral-none", "qwen2-window-layers", "qwen2-off", "gemma2-alternating"])
def test_layer_windows_are_what_transformers_uses(config):
    assert list(layer_windows(config, config.num_hidden_layers)) == _transformers_windows(config)


def test_a_model_whose_code_builds_no_sliding_mask_has_no_window():
    """A Llama config with a stray ``sliding_window`` still attends fully (modeling_llama never slides)."""
    config = LlamaConfig(num_hidden_layers=2)
    config.sliding_window = 4
    assert layer_windows(config, 2, LlamaRMSNorm(4)) == (None, None)


@pytest.mark.parametrize("config, match", [
    (SimpleNamespace(layer_types=["full_attention", "chunked_attention"], sliding_window=None), "chunked_attention"),
    (SimpleNamespace(layer_types=None, sliding_window=None, attention_chunk_size=16), "chunked attention"),
    (SimpleNamespace(layer_types=["full_attention"], sliding_window=None), "2 decoder layers"),
    (SimpleNamespace(layer_types=["sliding_attention"] * 2, sliding_window=None), "sliding_window"),
    (SimpleNamespace(is_causal=False, layer_types=None, sliding_window=None), "causal"),
], ids=["chunked-layers", "chunk-size", "layer-count", "no-window", "bidirectional"])
def test_attention_the_masks_cannot_express_is_refused(config, match):
    with pytest.raises(UnsupportedModelError, match=match):
        layer_windows(config, 2)


@pytest.mark.parametrize("family", V.WINDOW_FAMILIES)
def test_the_window_changes_what_sdpa_computes(family):
    """The sliding-window variants' invariant cells are not vacuous: on their prompts, the window matters."""
    windowed = V.build(family, "sdpa", num_layers=2)
    config = V.config_for(family, 2)
    config.text_config.sliding_window = None
    if getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = ["full_attention"] * 2
    torch.manual_seed(0)
    full = V.model_class(family)._from_config(config, attn_implementation="sdpa").eval()
    full.load_state_dict(windowed.state_dict())
    inputs = V.make_inputs(family, PROMPTS)
    with torch.no_grad():
        a, b = windowed(**inputs).logits, full(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (a - b)[valid].abs().max() > 1e-3


@pytest.mark.parametrize("family", V.WINDOW_FAMILIES)
def test_masks_apply_each_layers_window_by_original_position(family):
    model = V.build(family, "sdpa", num_layers=2)
    P.apply(model, prune={"layers": [1], "keep_ratios": [0.5]})
    windows = model.config.get_text_config().sliding_window
    out = model(**V.make_inputs(family, PROMPTS))
    state = out.hf_kan_state
    assert state.windows == ((windows, windows) if family == "llava_next_mistral" else (None, windows))
    # layer 1 holds the kept rows only: its window counts original positions, not slots
    q = state.query_layout(1)
    k = state.key_layout(1, state.cache.ledger.key_positions(1).shape[1])[0]
    mask, _ = state.mask_for(1, k.length)
    gap = q.position[:, :, None] - k.position[:, None, :]
    seen = mask[:, 0] & (gap > 0)
    assert bool((gap[seen] < windows).all()) and bool(seen.any())
    assert bool(((gap > 0) & (gap < windows) & k.valid[:, None, :] & ~mask[:, 0]).sum() == 0)


def test_an_attention_window_other_than_the_configs_raises():
    """Mistral ignores ``layer_types`` (Transformers warns) and slides every layer: the masks, read from the config,
    would not match what the model does, so the forward stops."""
    model = V.build("llava_next_mistral", "sdpa", num_layers=2)
    model.config.text_config.layer_types = ["full_attention", "full_attention"]
    P.apply(model)
    with pytest.raises(UnsupportedModelError, match="sliding_window=8"):
        model(**V.make_inputs("llava_next_mistral", PROMPTS))
