"""The lmms-free runner: patch settings, batched generation, efficiency records, log-likelihoods, task evaluation."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from hf_kan.eval import EvalSample, PatchSetting, Runner, evaluate_task, include_path, task_samples
from hf_kan.eval.metrics import load_metric
from hf_kan.eval.runner import _truncate
from hf_kan.eval.tasks import TaskSpec, digits_dataset, get_task, register_task

from hf_kan import patches
from hf_kan.errors import HFKanConfigError, UnsupportedModelError

N = 12


@pytest.fixture(scope="module")
def runner(tiny_llava_dir) -> Runner:
    return Runner.from_pretrained(str(tiny_llava_dir), batch_size=4, max_new_tokens=1)


@pytest.fixture(scope="module")
def samples() -> list[EvalSample]:
    return task_samples("hf_kan_digits", limit=N)


# ----------------------------------------------------------------------------------------------------- settings


def test_patch_setting_text_forms():
    assert PatchSetting.parse("off").patch_arguments({"mma": {"x": 1}}) == dict.fromkeys(("mma", "var", "prune",
                                                                                          "dyvte"), False)
    s = PatchSetting.parse('prune={"method":"fastv","keep_ratios":[0.25]},mma=false,dyvte=none')
    assert s.prune == {"method": "fastv", "keep_ratios": [0.25]} and s.mma is False and s.dyvte is None
    assert PatchSetting.parse("prune=pdrop").prune == "pdrop" and PatchSetting.parse("var=true").var is True
    # None falls back to what the checkpoint saved (or off), so settings evaluated in turn do not leak
    saved = {"mma": {"assistant_token_ids": [5]}}
    assert PatchSetting.parse("prune=fastv").patch_arguments(saved) == {
        "mma": {"assistant_token_ids": [5]}, "var": False, "prune": "fastv", "dyvte": False}
    for bad in ("prune", "speed=1", "prune={oops"):
        with pytest.raises(HFKanConfigError):
            PatchSetting.parse(bad)


def test_patch_settings_follow_the_patch_registry():
    from dataclasses import dataclass

    from hf_kan.eval import settings
    from hf_kan.patches import registry
    from hf_kan.patches.engine.runtime import PatchRuntime

    assert settings.PATCH_NAMES == registry.names() == ("mma", "var", "prune", "dyvte")

    @dataclass
    class ExtraConfig:
        strength: float = 1.0

    registry.register(registry.PatchSpec(name="extra", config_class=ExtraConfig, runtime_class=PatchRuntime))
    try:
        assert settings.PATCH_NAMES[-1] == "extra"
        s = PatchSetting.parse('extra={"strength":2},prune=fastv')
        assert s.extra == {"text": 'extra={"strength":2},prune=fastv'}  # the notes field, not the patch
        assert s.patches == {"extra": {"strength": 2}, "prune": "fastv"} and s.prune == "fastv" and s.var is None
        assert s.patch_arguments({}) == {"mma": False, "var": False, "prune": "fastv", "dyvte": False,
                                         "extra": {"strength": 2}}
        assert PatchSetting.off().as_dict() == {"name": "off", **dict.fromkeys(settings.PATCH_NAMES, False)}
    finally:
        registry.unregister("extra")
    with pytest.raises(HFKanConfigError, match="keys in"):
        PatchSetting.parse("extra=true")
    with pytest.raises(HFKanConfigError, match="unknown patches"):
        PatchSetting(name="x", extra_patch=True)
    with pytest.raises(AttributeError):
        PatchSetting().no_such_patch  # noqa: B018


def test_importing_the_settings_module_loads_neither_torch_nor_the_patches():
    import subprocess

    code = ("import sys; import hf_kan.eval.settings as s; "
            "print(sorted(m for m in ('torch', 'transformers', 'hf_kan.patches') if m in sys.modules)); "
            "print(s.PatchSetting().name, s.split_pairs('a=1,b={\"x\":[1,2]}'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.splitlines() == ["[]", "checkpoint ['a=1', 'b={\"x\":[1,2]}']"]


# ----------------------------------------------------------------------------------------------------- generate


def test_batched_generation_equals_one_by_one(runner, samples):
    runner.apply("off")
    batched = runner.generate(samples)
    runner.batch_size = 1
    try:
        single = runner.generate(samples)
    finally:
        runner.batch_size = 4
    assert [g.text for g in batched] == [g.text for g in single]
    assert len({g.text for g in batched}) > 1  # the image changes the answer: the comparison has teeth
    # in batches the record comes from an extra batch-of-one prefill, alone from generate's own prefill: same figures
    assert [g.efficiency for g in batched] == [g.efficiency for g in single]
    assert all(g.timing["batch_size"] == 4 for g in batched) and all(g.timing["batch_size"] == 1 for g in single)


def test_efficiency_record_matches_patches_report(runner, samples):
    runner.apply("prune=fastv")  # K = 2 of 4 layers, keep floor(0.5 * 16 + 0.5) = 8 of 16 visual tokens
    record = runner.generate(samples[:1])[0].efficiency
    inputs = runner._encode([runner.format_prompt(samples[0].question, 1)], samples[:1])
    with torch.no_grad():
        report = patches.efficiency_report(runner.model, runner.model(**inputs, use_cache=True))
    text = int(inputs["attention_mask"].sum()) - 16
    assert record.visual_tokens == 16 and record.visual_tokens_kept == 8
    assert record.tokens_per_layer == [text + 16, text + 16, text + 8, text + 8] == report.tokens_per_layer
    assert record.visual_token_budget == pytest.approx((16 + 16 + 8 + 8) / (4 * 16))
    assert record.prefill_flops == report.flops and record.kv_cache_bytes == report.kv_cache_bytes
    runner.apply("off")
    full = runner.generate(samples[:1])[0].efficiency
    assert full.visual_tokens_kept == 16 and full.visual_token_budget == 1.0
    assert record.prefill_flops < full.prefill_flops and record.kv_cache_bytes < full.kv_cache_bytes


def test_truncate_at_stop_strings():
    assert _truncate("7 and more\nnext", ["\n", " and"]) == "7"
    assert _truncate("7", None) == "7" and _truncate("7", [""]) == "7"


def test_prompt_with_its_own_image_placeholder(runner):
    assert runner.format_prompt("<image> what digit is this ?", 1) == runner.format_prompt("what digit is this ?", 1)


# ----------------------------------------------------------------------------------------------------- likelihood


def test_loglikelihood_matches_a_manual_forward_in_padded_batches(runner, samples):
    runner.apply("off")
    conts = [" 3", " 4 5", " 1 2 3"]  # different lengths: the batch is left-padded
    scores = runner.loglikelihood(samples[:3], conts)
    for sample, cont, (score, greedy) in zip(samples[:3], conts, scores):
        prompt = runner.format_prompt(sample.question, 1)
        inputs = runner._encode([prompt + cont], [sample])
        with torch.no_grad():
            logits = runner.model(**inputs).logits[0].double()
        n = len(cont.split())
        target = inputs["input_ids"][0, -n:]
        logprobs = torch.log_softmax(logits[-n - 1:-1], -1)
        assert score == pytest.approx(logprobs.gather(-1, target[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == target).all())
    # the greedy answer is greedy
    answer = runner.generate(samples[:1], max_new_tokens=2)[0].text
    assert runner.loglikelihood(samples[:1], [" " + answer])[0][1] is True


@pytest.mark.parametrize("setting", ["prune=fastv", "dyvte=true"])
def test_loglikelihood_refused_under_token_dropping(runner, samples, setting):
    runner.apply(setting)
    try:
        with pytest.raises(UnsupportedModelError, match=setting.split("=")[0]):
            runner.loglikelihood(samples[:1], [" 3"])
    finally:
        runner.apply("off")


# ----------------------------------------------------------------------------------------------------- tasks


def test_answer_accuracy_metric_module():
    metric = load_metric("answer_accuracy")
    out = metric.compute(predictions=["Seven.", " 3 ", "4"], references=["seven", "3", "5"], return_scores=True)
    assert out == {"answer_accuracy": pytest.approx(2 / 3), "scores": [1, 1, 0]}


def test_digits_task_rows():
    data = digits_dataset("test")
    assert len(data) == 360 and data.column_names == ["id", "image", "question", "answer"]
    assert data[5]["id"] == 5 and data[5]["answer"] in [str(d) for d in range(10)]
    with pytest.raises(HFKanConfigError):
        get_task("no-such-task")


def test_evaluate_task_metrics_are_means_of_the_samples(runner):
    results = evaluate_task(runner, "hf_kan_digits", ["off", "prune=fastv"], limit=N)
    off, fastv = results
    assert off.setting["name"] == "off" and off.num_samples == N
    for result in results:
        rows = result.samples
        assert [r["id"] for r in rows] == list(range(N))
        accuracy = sum(r["prediction"] == r["answer"] for r in rows) / N
        assert result.metrics["answer_accuracy"] == pytest.approx(accuracy)
        assert result.metrics["prefill_flops"] == pytest.approx(sum(r["efficiency"]["prefill_flops"] for r in rows) / N)
    assert fastv.metrics["visual_tokens_kept"] == 8 and off.metrics["visual_tokens_kept"] == 16
    assert fastv.metrics["prefill_flops"] < off.metrics["prefill_flops"]
    assert [r["prediction"] for r in off.samples] != [r["prediction"] for r in fastv.samples]  # pruning matters here


def test_group_by_splits_the_accuracy(runner):
    spec = get_task("hf_kan_digits")

    def build(split):
        data = spec.build(split).select(range(N))
        return data.add_column("parity", ["even" if int(a) % 2 == 0 else "odd" for a in data["answer"]])

    register_task(TaskSpec(name="test_digits_parity", build=build, max_new_tokens=1, group_by="parity"), exist_ok=True)
    (result,) = evaluate_task(runner, "test_digits_parity", ["off"])
    for group in ("even", "odd"):
        rows = [r for r in result.samples if r["meta"]["parity"] == group]
        assert result.metrics[f"answer_accuracy/{group}"] == pytest.approx(sum(r["score"] for r in rows) / len(rows))


def test_shipped_task_yamls_name_registered_tasks():
    import pathlib

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    files = sorted(pathlib.Path(include_path()).glob("*.yaml"))
    assert files, include_path()
    for file in files:
        config = yaml.load(file.read_text(), Loader=Loader)
        assert get_task(config["task"]).name == file.stem
        assert config["class"] == "hf_kan.eval.lmms_task.HFKanTask"


def test_cli_prints_the_include_path(capsys):
    from hf_kan.cli import main

    assert main(["lmms-tasks"]) == 0
    assert capsys.readouterr().out.strip() == include_path()
    assert main(["lmms-tasks", "--list"]) == 0
    assert "hf_kan_digits" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- plugin


def test_manifest_function_never_raises(monkeypatch):
    from hf_kan.eval import lmms_plugin

    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # lmms-eval not importable
    assert lmms_plugin.manifests() == []

    class Manifest:
        def __init__(self, **kwargs):
            raise ValueError("rejected")

    fake = types.ModuleType("lmms_eval.models.registry_v2")
    fake.ModelManifest = Manifest
    for name in ("lmms_eval", "lmms_eval.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "lmms_eval.models.registry_v2", fake)
    assert lmms_plugin.manifests() == []

    fake.ModelManifest = lambda **kwargs: kwargs
    (manifest,) = lmms_plugin.manifests()
    assert manifest == {"model_id": "hf_kan", "simple_class_path": "hf_kan.eval.lmms_model.HFKanLMMS",
                        "aliases": ("hf-kan",)}


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "hf_kan"]
    assert ep.value == "hf_kan.eval.lmms_plugin:manifests"
