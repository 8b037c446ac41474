"""Attention debiasing for pruning: positional trend (fit and use) and padding suppression."""

import pytest
import torch
import vlm_models as V
from hf_kan.patches.prune.calibrate import collect_scores
from hf_kan.patches.prune.debias import debias_scores, fit_trend, image_padding_fractions, visual_index
from test_pruning_core import PROMPTS, K, kept_positions, model_for

import hf_kan  # noqa: F401
from hf_kan import patches as P


def _kept_visual(out, ids, b):
    kept = kept_positions(out)[b]
    kept = kept[kept >= 0]
    return kept[ids[b, kept] == V.IMAGE].tolist()


@pytest.mark.parametrize("family", V.FAMILIES)
def test_zero_trend_without_padding_changes_nothing(family):
    model = model_for(family)
    inputs = V.make_inputs(family, PROMPTS, "left")
    results = []
    for debias in (False, True):
        P.apply(model, mma=False, prune={"layers": [K], "keep_ratios": [0.5], "debias": debias, "trend": 0.0})
        with torch.no_grad():
            results.append(model(**inputs))
    assert torch.equal(kept_positions(results[0]), kept_positions(results[1]))
    torch.testing.assert_close(results[0].logits, results[1].logits, rtol=0, atol=0)
    if family == "llava":  # random pixels have no padding bands: the padding table exists and is all zero
        assert results[1].hf_kan_state.scratch["prune"]["padding"].abs().max() == 0
    else:  # LLaVA-NeXT (unpadded by the model) and Qwen (no processor padding): nothing to suppress
        assert results[1].hf_kan_state.scratch["prune"]["padding"] is None


def _padded_llava_inputs():
    inputs = V.make_inputs("llava", [V.standard_prompt(1, before=2), V.standard_prompt(1, before=4)], "left")
    pv = inputs["pixel_values"]
    pv[0, :, :4] = 0.0  # expand-to-square bands (the mean colour normalises to ~0): grid rows 0 and 3 of image 0
    pv[0, :, 12:] = 0.0
    pv[1, :, :, :2] = 0.0  # image 1: 2-px bands left and right -> half of grid columns 0 and 3 is padding
    pv[1, :, :, 14:] = 0.0
    return inputs


def test_padding_fractions_by_hand():
    pv = torch.randn(2, 3, 8, 8)
    pv[0, :, :2] = 0.01  # top band of 2 rows: half of the top row of 4x4 patches
    pv[1] = 0.0
    frac = image_padding_fractions(pv, 4)
    assert frac[0].tolist() == [[0.5, 0.5], [0.0, 0.0]]
    assert frac[1].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    grey_inside = torch.randn(1, 3, 8, 8)
    grey_inside[0, :, 3:5, 3:5] = 0.0  # a mean-grey region inside the image is not padding
    assert image_padding_fractions(grey_inside, 4).abs().max() == 0


def test_padding_tokens_never_kept_while_real_ones_remain():
    model = model_for("llava")
    inputs = _padded_llava_inputs()
    ids = inputs["input_ids"]
    img0 = (ids[0] == V.IMAGE).nonzero().flatten()
    real0 = set(img0.view(4, 4)[1:3].flatten().tolist())  # grid rows 1 and 2
    for ratio in (0.75, 0.25):
        P.apply(model, mma=False, prune={"layers": [K], "keep_ratios": [ratio], "debias": True})
        with torch.no_grad():
            out = model(**inputs)
        kept0 = set(_kept_visual(out, ids, 0))
        assert kept0 <= real0
        assert len(kept0) == min(round(16 * ratio), 8)  # the keep count is capped at the 8 real tokens
        # image 1: padding fraction 0.5 is not above the threshold, so nothing is suppressed there
        assert len(_kept_visual(out, ids, 1)) == round(16 * ratio)
    P.apply(model, prune={"layers": [K], "keep_ratios": [0.75], "debias": False})
    with torch.no_grad():
        plain = model(**inputs)
    assert len(set(_kept_visual(plain, ids, 0)) - real0) >= 4  # without suppression padding tokens must stay

    # generate never sees pixel_values in forward: padding_cache carries the padding table
    P.apply(model, prune={"layers": [K], "keep_ratios": [0.25], "debias": True})
    gen = model.generate(**inputs, cache=P.padding_cache(model, inputs["pixel_values"]), max_new_tokens=2,
                         do_sample=False, suppress_tokens=V.SUPPRESS, return_dict_in_generate=True)
    with torch.no_grad():
        out = model(**inputs)
    assert torch.equal(kept_positions(gen), kept_positions(out))


def test_positional_trend_divides_scores_and_fit_recovers_b():
    scores = torch.rand(2, 6) + 0.5
    index = visual_index(torch.tensor([[False, True, True, True, False, True]] * 2))
    assert index[0].tolist() == [-1, 0, 1, 2, -1, 3]
    out, pad = debias_scores(scores, index, None, 0.3, 0.5)
    expected = scores / torch.exp(-0.3 * index.clamp(min=0).float())
    torch.testing.assert_close(out, expected)
    assert pad is None
    gen = torch.Generator().manual_seed(0)
    samples = [torch.exp(0.01 * torch.arange(n)) * (1 + 0.05 * torch.randn(n, generator=gen)) for n in (576, 400, 576)]
    assert abs(fit_trend(samples) - (-0.01)) < 1e-3  # recency: attention grows along the sequence -> b < 0


@pytest.mark.parametrize("form", [{"debias": True, "trend": -2.0}, {"debias": {"multiplier_b": 2.0}}])
def test_strong_trend_keeps_the_earliest_tokens(form):
    """Dividing by T(i) = exp(-b i) with the fitted-trend b = -2 (or, in the paper's multiplier form, multiplying by
    exp(-2 i)) makes later tokens hopeless: the first k visual tokens win."""
    model = model_for("llava")
    P.apply(model, mma=False, prune={"layers": [K], "keep_ratios": [0.25], **form})
    assert P.status(model)["patches"]["prune"]["debias"] is True
    inputs = V.make_inputs("llava", PROMPTS, "left")
    with torch.no_grad():
        out = model(**inputs)
    ids = inputs["input_ids"]
    for b in range(2):
        visual = (ids[b] == V.IMAGE).nonzero().flatten()
        k = round(0.25 * visual.numel())
        assert _kept_visual(out, ids, b) == visual[:k].tolist()


def test_multiplier_form_is_the_negated_trend():
    from hf_kan.patches.prune.config import PruneConfig

    paper = PruneConfig(debias={"multiplier_b": 0.003, "stages": [0]})
    assert paper.debias and paper.multiplier_b == 0.003 and paper.trend == 0.0 and paper.correction_b == -0.003
    assert PruneConfig(debias=True, trend=-0.003).correction_b == -0.003
    assert PruneConfig(**paper.to_dict()) == paper  # stored as given, restored as given
    index = visual_index(torch.ones(1, 5, dtype=torch.bool))
    scores = torch.rand(1, 5) + 0.5
    out, _ = debias_scores(scores, index, None, paper.correction_b, 0.5)
    torch.testing.assert_close(out, scores * torch.exp(-0.003 * torch.arange(5.0)))  # the paper's multiplier


def test_calibrate_trend_fits_and_stores_b():
    model = model_for("qwen2_vl")
    P.apply(model, mma=False, prune={"layers": [K], "keep_ratios": [0.5], "debias": True})
    calib = [V.make_inputs("qwen2_vl", [V.standard_prompt(1, before=2 + s)], seed=s) for s in range(3)]
    scores = collect_scores(model, calib)
    assert len(scores) == 3 and all(s.numel() == 6 for s in scores) and all(bool((s > 0).all()) for s in scores)
    P.apply(model, prune={"debias": True, "trend": 0.0, "multiplier_b": 0.004})
    b = P.calibrate_trend(model, calib)
    assert b == pytest.approx(fit_trend(scores), abs=1e-12)
    assert P.status(model)["patches"]["prune"]["multiplier_b"] is None  # the fitted trend replaces it
    assert P.status(model)["patches"]["prune"]["trend"] == pytest.approx(b)
    assert P.status(model)["patches"]["prune"]["keep_ratios"] == [0.5]  # the probe's settings did not leak


def test_calibrate_prune_command_stores_the_trend(tmp_path):
    import json

    import numpy as np
    from hf_kan.patches.prune.calibrate import calibration_images, calibration_inputs
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    from hf_kan.cli import main

    model = V.build("llava", num_layers=3)
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=V.chat_tokenizer(), patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=template)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert main(["calibrate-prune", str(tmp_path), "--num-images", "3", "--prompt", "w10 w11", "--save"]) == 0
    stored = json.loads((tmp_path / "config.json").read_text())["text_config"]["hf_kan"]["prune"]
    assert stored["debias"] and stored["layers"] == [2]
    # the stored b is the fit on the same three inputs, computed here by the library call
    P.apply(model, prune={"method": "fastv", "debias": True})
    inputs = calibration_inputs(processor, calibration_images(None, 3), "w10 w11")
    assert inputs[0]["input_ids"][0].tolist().count(V.IMAGE) == 16
    assert stored["trend"] == pytest.approx(P.calibrate_trend(model, inputs, store=False), rel=1e-6)
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "a.png")
    assert len(calibration_images(str(images), 5)) == 1
