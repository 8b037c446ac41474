"""PDrop scored at each stage's own layer (``score_layer="own"``, PyramidDrop's release) against a hand-run of the
decoder layers: the stage layer's input norm and q/k projections on the hidden states entering it, top-k of the last
prompt token's head-averaged attention, the kept rows at their original RoPE positions. The release renumbers the
positions after each drop; the same hand-run with renumbered positions measures how far that moves the logits.

Model: the tiny LLaVA (Llama, 4 heads / 2 KV heads) with 4 decoder layers, PDrop stages at layers 1 and 2."""

import pytest
import torch
import vlm_models as V
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import hf_kan  # noqa: F401
from hf_kan import patches as P

LAYERS = 4
STAGES = {1: 0.5, 2: 0.25}
PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]

model_for = V.module_model_cache(LAYERS)


def hand_run(inputs: dict, renumber: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """PDrop by hand on the eager model for ONE unpadded sample: the kept original positions after each stage and the
    logits of the rows reaching the head. ``renumber``: RoPE positions 0..n-1 of the current rows (the release)."""
    ref = model_for("llava", "eager")
    lm = ref.model.language_model
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        ref(**inputs)
    handle.remove()
    hidden, ids = seen["h"], inputs["input_ids"][0]
    pos = torch.arange(ids.numel())
    n_visual = int((ids == V.IMAGE).sum())
    kept = []
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            rope = (torch.arange(pos.numel()) if renumber else pos)[None]
            cos, sin = lm.rotary_emb(hidden, rope)
            if i in STAGES:
                attn = layer.self_attn
                x = layer.input_layernorm(hidden)
                q = attn.q_proj(x).view(1, pos.numel(), -1, attn.head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(1, pos.numel(), -1, attn.head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = repeat_kv(k, attn.num_key_value_groups)
                score = torch.softmax(q[:, :, -1:] @ k.transpose(-1, -2) * attn.scaling, -1).mean(1)[0, 0]
                visual = ids[pos] == V.IMAGE
                count = int(STAGES[i] * n_visual + 0.5)
                top = visual.nonzero().flatten()[score[visual].topk(count).indices]
                keep = ~visual
                keep[top] = True
                hidden, pos = hidden[:, keep], pos[keep]
                kept.append(pos.clone())
                rope = (torch.arange(pos.numel()) if renumber else pos)[None]
                cos, sin = lm.rotary_emb(hidden, rope)
            n = pos.numel()
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=rope)
        return kept, ref.lm_head(lm.norm(hidden))[0]


def pdrop(score_layer: str):
    model = model_for("llava")
    P.apply(model, prune={"method": "pdrop", "layers": list(STAGES), "keep_ratios": list(STAGES.values()),
                          "score_layer": score_layer})
    return model


@pytest.mark.parametrize("sample", [0, 1])
def test_pdrop_keep_sets_at_the_stage_layer_equal_a_hand_run(sample):
    inputs = V.sample_inputs("llava", V.make_inputs("llava", PROMPTS, "left"), sample)
    kept, logits = hand_run(inputs)
    model = pdrop("own")
    assert P.status(model)["patches"]["prune"]["score_layer"] == "own"
    with torch.no_grad():
        out = model(**inputs)
    record = out.hf_kan_state.scratch["prune"]["kept"]
    for stage, want in enumerate(kept):
        got = record[stage][0]
        assert got[got >= 0].tolist() == want.tolist()
    torch.testing.assert_close(out.logits[0], logits, rtol=1e-5, atol=1e-5)
    # FastV's rule (layer K-1's attention) ranks differently here
    with torch.no_grad():
        previous = pdrop("previous")(**inputs).hf_kan_state.scratch["prune"]["kept"]
    assert any(not torch.equal(previous[s], record[s]) for s in record)


def test_renumbered_positions_of_the_release_move_the_logits():
    """The release renumbers the kept tokens' positions after each drop; hf-kan keeps the original positions. Same
    keep set at the first stage (scored before any renumbering); the last token's logits differ (printed: the README
    quotes this run, ``python -m pytest tests/patches/test_prune_own_layer.py -k renumbered -s``)."""
    diffs, spread = [], []
    for sample in range(2):
        inputs = V.sample_inputs("llava", V.make_inputs("llava", PROMPTS, "left"), sample)
        kept, logits = hand_run(inputs)
        kept_r, logits_r = hand_run(inputs, renumber=True)
        assert torch.equal(kept[0], kept_r[0])
        diffs.append(float((logits[-1] - logits_r[-1]).abs().max()))
        spread.append(float(logits[-1].std()))
    print(f"\nmax |difference| of the last token's logits, original vs renumbered positions (tiny LLaVA, PDrop "
          f"at layers 1/2, 2 prompts): {max(diffs):.2g} (per prompt: {', '.join(f'{d:.2g}' for d in diffs)}; the "
          f"logits' standard deviation: {', '.join(f'{d:.2g}' for d in spread)})")
    assert max(diffs) > 1e-3


@pytest.mark.parametrize("score_layer", ["own", "previous"])
def test_image_after_a_cached_prefix_scores_like_one_forward(score_layer):
    """The image arrives in a second forward, after a cached text prefix: the stage layers' cached prefix keys join
    the voter's softmax, so scores and keep sets equal those of one forward over the whole prompt."""
    inputs = V.sample_inputs("llava", V.make_inputs("llava", PROMPTS, "left"), 1)
    model = pdrop(score_layer)
    split = 4  # BOS USER w w | w w w <image> ...
    assert int((inputs["input_ids"][0, :split] == V.IMAGE).sum()) == 0
    with torch.no_grad():
        whole = model(**inputs).hf_kan_state.scratch["prune"]
        first = model(input_ids=inputs["input_ids"][:, :split], attention_mask=inputs["attention_mask"][:, :split])
        second = model(input_ids=inputs["input_ids"][:, split:], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"], cache=first.cache).hf_kan_state.scratch["prune"]
    for stage in range(len(STAGES)):
        torch.testing.assert_close(second["scores"][stage], whole["scores"][stage][:, split:], rtol=1e-5, atol=1e-6)
        assert torch.equal(second["kept"][stage], whole["kept"][stage][:, -second["kept"][stage].shape[1]:])
