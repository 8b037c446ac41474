"""DyVTE as released: router features [mean of the text after the image WITHOUT the last prompt token ; last prompt
token], and routers trained with the authors' code (``model.visual_gates_router.<i>.w1/w2.weight``, width 2048, no
biases) loaded into ``hf_kan_dyvte``: p(exit) and exit layers against a hand computation from an sdpa copy's hidden
states.

Model: the tiny LLaVA (hidden 32, so the release's w1 is (2048, 64)) with 3 decoder layers."""

import pytest
import torch
import vlm_models as V
from safetensors.torch import save_file

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import HFKanConfigError

LAYERS = 3
WIDTH = 2048
PROMPTS = [V.standard_prompt(1, before=1), V.standard_prompt(1, before=5, after=4)]

model_for = V.module_model_cache(LAYERS)


def released_state(seed: int = 0, hidden: int = 32) -> dict[str, torch.Tensor]:
    """A random state dict in the release's layout: a router after EVERY decoder layer, inside the LLaVA model."""
    gen = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.zeros(4, hidden)}  # other weights of their checkpoint are ignored
    for i in range(LAYERS):
        out[f"model.visual_gates_router.{i}.w1.weight"] = torch.randn(WIDTH, 2 * hidden, generator=gen)
        out[f"model.visual_gates_router.{i}.w2.weight"] = torch.randn(2, WIDTH, generator=gen) * 0.1
    return out


def hand_p_exit(state: dict, inputs: dict) -> torch.Tensor:
    """(layers, B) p(exit) of the release's routers by hand, from the unpatched model's hidden states."""
    with torch.no_grad():
        hidden = model_for("llava", "sdpa")(**inputs, output_hidden_states=True).hidden_states
    ids, am = inputs["input_ids"], inputs["attention_mask"].bool()
    out = torch.zeros(LAYERS - 1, ids.shape[0])
    for layer in range(LAYERS - 1):
        w1 = state[f"model.visual_gates_router.{layer}.w1.weight"]
        w2 = state[f"model.visual_gates_router.{layer}.w2.weight"]
        for b in range(ids.shape[0]):
            h = hidden[layer + 1][b]  # output of decoder layer `layer`
            last = int(am[b].nonzero().max())
            first_image = int((ids[b] == V.IMAGE).nonzero().min())
            text = [i for i in range(first_image + 1, last) if int(ids[b, i]) != V.IMAGE]
            feature = torch.cat([h[text].mean(0), h[last]])
            logits = w2 @ torch.nn.functional.gelu(w1 @ feature)
            out[layer, b] = torch.softmax(logits, -1)[1]
    return out


@pytest.mark.parametrize("source", ["state_dict", "safetensors"])
def test_released_routers_load_and_give_the_hand_computed_p_exit(source, tmp_path):
    state = released_state()
    if source == "safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
        loaded_from = tmp_path
    else:
        loaded_from = state
    model = model_for("llava")
    P.apply(model, dyvte=False)
    routers = P.load_released_routers(model, loaded_from, threshold=0.999999)
    cfg = P.status(model)["patches"]["dyvte"]
    assert cfg["router_hidden"] == WIDTH and cfg["layers"] == [0, 1]  # the last layer's router is skipped
    assert torch.equal(routers.routers["1"].fc2.weight, state["model.visual_gates_router.1.w2.weight"])
    inputs = V.make_inputs("llava", PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs)
    want = hand_p_exit(state, inputs)
    p = out.hf_kan_state.scratch["dyvte"]["p_exit"]
    assert P.exit_layers(out).tolist() == [-1, -1]
    for layer in range(LAYERS - 1):
        torch.testing.assert_close(p[layer], want[layer], rtol=0, atol=1e-6)
    assert (want - 0.5).abs().max() > 0.05  # the routers are far from the untrained 0.5
    # the release exits at the first layer whose exit logit beats the keep logit: p(exit) > 0.5
    P.apply(model, dyvte={"threshold": 0.5})
    with torch.no_grad():
        exits = P.exit_layers(model(**inputs))
    first = [next((layer for layer in range(LAYERS - 1) if want[layer, b] > 0.5), -1) for b in range(2)]
    assert exits.tolist() == first


def test_released_router_errors():
    model = model_for("llava")
    with pytest.raises(HFKanConfigError, match="no DyVTE router"):
        P.load_released_routers(model, {"model.embed_tokens.weight": torch.zeros(1)})
    state = released_state()
    del state["model.visual_gates_router.0.w2.weight"]
    with pytest.raises(HFKanConfigError, match="lack w1 or w2"):
        P.load_released_routers(model, state)
    with pytest.raises(HFKanConfigError, match="do not fit"):
        P.load_released_routers(model, released_state(hidden=16))
