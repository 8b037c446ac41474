"""Efficiency accounting of pruned forwards and the kept-token picture."""

import numpy as np
import torch
import vlm_models as V
from hf_kan.patches.engine.efficiency import layer_flops
from hf_kan.patches.prune.picture import overlay
from PIL import Image
from test_pruning_core import LAYERS, PROMPTS, K, kept_positions, model_for

import hf_kan  # noqa: F401
from hf_kan import patches as P


def test_layer_flops_by_hand():
    cfg = model_for("llava").config.text_config  # hidden 32, 4 heads of 8, 2 KV heads, MLP 64
    linear = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64)
    assert layer_flops(cfg, 1, 1) == linear + 4 * 4 * 8
    assert layer_flops(cfg, torch.tensor([3, 2]), torch.tensor([5, 4])) == 5 * linear + 4 * 32 * (15 + 8)


def test_report_of_pruned_and_unpruned_forwards():
    model = model_for("llava")
    inputs = V.make_inputs("llava", PROMPTS, "left")
    cfg = model.config.text_config
    real = inputs["attention_mask"].sum(-1)
    P.apply(model, mma=False, prune=False)
    with torch.no_grad():
        full = P.efficiency_report(model, model(**inputs))
    assert full.tokens_per_layer == [int(real.sum())] * LAYERS == full.keys_per_layer
    assert full.flops == LAYERS * layer_flops(cfg, real, real)

    P.apply(model, prune={"layers": [K], "keep_ratios": [0.5]})
    with torch.no_grad():
        out = model(**inputs)
    rep = P.efficiency_report(model, out)
    kept = kept_positions(out)
    n_kept = (kept >= 0).sum(-1)
    assert rep.tokens_per_layer == [int(real.sum())] * K + [int(n_kept.sum())] * (LAYERS - K)
    assert rep.keys_per_layer == rep.tokens_per_layer
    assert rep.flops == K * layer_flops(cfg, real, real) + (LAYERS - K) * layer_flops(cfg, n_kept, n_kept)
    assert rep.flops_ratio(full) < 1
    actual = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in out.cache.layers)
    assert rep.kv_cache_bytes == actual < full.kv_cache_bytes
    assert rep.kv_slots_per_layer == [2 * inputs["input_ids"].shape[1]] * K + [2 * kept.shape[1]] * (LAYERS - K)

    # generate: the report is the prefill's, although the cache grew afterwards
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=V.SUPPRESS,
                         return_dict_in_generate=True)
    grep = P.efficiency_report(model, gen)
    assert grep.as_dict() == rep.as_dict()


def test_kept_token_grid_and_png(tmp_path):
    model = model_for("llava")
    P.apply(model, mma=False, prune={"layers": [K], "keep_ratios": [0.25]})
    inputs = V.make_inputs("llava", PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs)
    state = out.hf_kan_state
    ids = inputs["input_ids"]
    kept = kept_positions(out)
    for b, image in ((0, 1), (1, 0)):
        grid = P.kept_token_grid(state, sample=b, image_index=image)
        cols = (ids[b] == V.IMAGE).nonzero().flatten()[16 * image:16 * (image + 1)]  # this image's 16 tokens
        expected = torch.isin(cols, kept[b]).view(4, 4)
        assert grid.shape == (4, 4) and torch.equal(grid, expected)
    # 25% of each sample's visual tokens survive: 8 of sample 0's two images, 4 of sample 1's image
    assert int(P.kept_token_grid(state, 0, 0).sum() + P.kept_token_grid(state, 0, 1).sum()) == 8
    assert int(P.kept_token_grid(state, 1, 0).sum()) == 4
    picture = np.ones((16, 16, 3))
    arr = overlay(picture, grid, dim=0.25)
    cell = np.kron(grid.numpy(), np.ones((4, 4)))  # 4 x 4 pixels per token
    np.testing.assert_allclose(arr[..., 0], np.where(cell > 0, 1.0, 0.25))
    path = tmp_path / "kept.png"
    P.plot_kept_tokens(Image.fromarray(np.full((64, 64, 3), 200, np.uint8)), grid, path)
    assert Image.open(path).size[0] > 64


def test_kept_token_grid_qwen():
    model = model_for("qwen2_vl")
    P.apply(model, mma=False, prune={"layers": [K], "keep_ratios": [0.5]})
    inputs = V.make_inputs("qwen2_vl", PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs)
    expected = {(0, 0): (2, 3), (0, 1): (2, 2), (1, 0): (3, 2)}  # thw (1,4,6), (1,4,4), (1,6,4), merge 2
    for (b, image), shape in expected.items():
        grid = P.kept_token_grid(out.hf_kan_state, sample=b, image_index=image)
        assert grid.shape == shape
    # each sample keeps half of its visual tokens in total
    assert int(P.kept_token_grid(out.hf_kan_state, 0, 0).sum() + P.kept_token_grid(out.hf_kan_state, 0, 1).sum()) == 5
    assert int(P.kept_token_grid(out.hf_kan_state, 1, 0).sum()) == 3


def test_report_of_a_decode_step():
    """A decode step's report: one query row per sample, keys = what each layer's (pruned) cache holds."""
    model = model_for("llava")
    P.apply(model, mma=False, prune={"layers": [K], "keep_ratios": [0.5]})
    inputs = V.make_inputs("llava", PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        step = model(input_ids=token, attention_mask=mask, cache=out.cache,
                     position_ids=inputs["attention_mask"].sum(-1, keepdim=True))
    rep = P.efficiency_report(model, step.hf_kan_state)
    assert rep.as_dict() == P.efficiency_report(model, step).as_dict()
    real = inputs["attention_mask"].sum(-1) + 1
    n_kept = (kept_positions(out) >= 0).sum(-1) + 1
    assert rep.tokens_per_layer == [2] * LAYERS
    assert rep.keys_per_layer == [int(real.sum())] * K + [int(n_kept.sum())] * (LAYERS - K)
    cfg = model.config.text_config
    assert rep.flops == K * layer_flops(cfg, [1, 1], real) + (LAYERS - K) * layer_flops(cfg, [1, 1], n_kept)
