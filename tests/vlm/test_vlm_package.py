"""``hf-kan vlm-package``: calibrations, trained DyVTE routers and the reference figure land in the packaged model,
and the package's data globs ship every file it writes."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_shapes_vlm import PACKAGE_OPTIONS, packaged_tiny_model

from hf_kan.errors import HFKanConfigError, ShippedModelMissingError
from hf_kan.vlm.package import copy_model
from hf_kan.vlm.pretrained import REFERENCE_FILE, SHIPPED_MODEL, pretrained_path

ROOT = Path(__file__).resolve().parents[2]


def package_data_globs(package: str) -> list[str]:
    """The globs of ``package`` in pyproject's ``[tool.setuptools.package-data]`` (one JSON-style list per line;
    read by hand: ``tomllib`` needs Python 3.11 and hf-kan supports 3.10)."""
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith(f'"{package}" ='))
    return json.loads(line.split("=", 1)[1])


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    return packaged_tiny_model(str(tmp_path_factory.getbasetemp() / "tiny-shapes-vlm"))


@pytest.mark.slow
def test_package_stores_calibrations_routers_and_reference(packaged):
    from hf_kan.eval import PatchSetting, Runner, evaluate_task

    trained, out, report = packaged
    hf_kan_section = json.loads((out / "config.json").read_text())["text_config"]["hf_kan"]
    assert hf_kan_section["prune"]["debias"] is True
    assert hf_kan_section["prune"]["trend"] == pytest.approx(report["prune_trend"]) and report["prune_trend"] != 0
    assert hf_kan_section["var"]["sink_dims"] == report["var"]["sink_dims"]
    assert len(report["var"]["scores"]) == 2 and report["var"]["median_score"] > 0
    assert hf_kan_section["dyvte"]["layers"] == [0, 1, 2]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        router_keys = [k for k in f.keys() if k.startswith("hf_kan_dyvte.routers.")]
        # untrained routers start with a zero output layer (never exit): trained ones are not zero
        assert router_keys and any(f.get_tensor(k).abs().sum() > 0 for k in router_keys if "fc2" in k)
    assert "test_loss" in report["dyvte"] and "validation_loss" in report["dyvte"]
    assert not (out / "history.jsonl").exists() and (trained / "history.jsonl").exists()
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in out.iterdir())
    assert json.loads((out / "calibration.json").read_text())["prune_trend"] == report["prune_trend"]
    card = (out / "README.md").read_text()  # the card loads the model with its patches and lists the calibrations
    assert "patches.from_pretrained(LlavaForConditionalGeneration" in card and str(report["var"]["sink_dims"]) in card

    # the stored reference is what the packaged model scores with every patch off on those rows
    reference = json.loads((out / REFERENCE_FILE).read_text())
    assert reference["limit"] == PACKAGE_OPTIONS["reference_limit"] and reference["tolerance"] > 0
    runner = Runner.from_pretrained(str(out), batch_size=8, efficiency=False)
    result = evaluate_task(runner, reference["task"], [PatchSetting.off()], limit=reference["limit"])[0]
    assert result.metrics["answer_accuracy"] == pytest.approx(reference["accuracy"]["overall"])
    for kind in ("colour", "shape", "presence", "count", "position"):
        assert result.metrics[f"answer_accuracy/{kind}"] == pytest.approx(reference["accuracy"][kind])

    # every file the pipeline writes is package data of the wheel (pyproject's globs for the hf_kan package)
    globs = package_data_globs("hf_kan")
    for path in out.iterdir():
        relative = f"assets/{SHIPPED_MODEL}/{path.name}"
        assert any(fnmatch.fnmatch(relative, g) for g in globs), f"{relative} matches no package-data glob {globs}"


def test_shipped_model_missing_is_a_clear_error():
    with pytest.raises(ShippedModelMissingError, match="hf-kan vlm-package"):
        pretrained_path("no_such_model")
    assert issubclass(ShippedModelMissingError, FileNotFoundError)


def test_copy_model_needs_a_trained_directory(tmp_path):
    with pytest.raises(HFKanConfigError, match="not a trained model directory"):
        copy_model(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text("{}")
    torch.save({}, tmp_path / "model.safetensors")
    with pytest.raises(HFKanConfigError, match="must differ"):
        copy_model(tmp_path, tmp_path)
