"""The model shipped in the package loads from the package and scores the figure the README states
(``reference_scores.json``, written by ``hf-kan vlm-package``, holds the figure, the subset and the tolerance)."""

from __future__ import annotations

import json

import pytest

from hf_kan.vlm.pretrained import REFERENCE_FILE, assets_dir


def test_shipped_model_scores_the_stated_figure():
    from hf_kan.eval import PatchSetting, Runner, evaluate_task

    from hf_kan.vlm import load_pretrained, pretrained_path
    from hf_kan.vlm.modeling import use_rational_backend

    folder = assets_dir()
    if not (folder / "model.safetensors").is_file() or not (folder / REFERENCE_FILE).is_file():
        pytest.skip(f"the shipped model is not in this checkout ({folder} holds no model.safetensors / "
                    f"{REFERENCE_FILE}); it is produced by `hf-kan vlm-package MODEL_DIR`")
    reference = json.loads((folder / REFERENCE_FILE).read_text())
    model, processor = load_pretrained()  # from the package, with its saved patches attached
    assert pretrained_path() == folder and model.config.vision_config.model_type == "kat"
    use_rational_backend(model, "reference")
    runner = Runner(model, processor, batch_size=16, efficiency=False)
    result = evaluate_task(runner, reference["task"], [PatchSetting.off()], limit=reference["limit"])[0]
    tolerance = reference["tolerance"]
    assert result.metrics["answer_accuracy"] == pytest.approx(reference["accuracy"]["overall"], abs=tolerance)
    for kind, value in reference["accuracy"].items():
        if kind != "overall":
            assert result.metrics[f"answer_accuracy/{kind}"] == pytest.approx(value, abs=5 * tolerance), kind
