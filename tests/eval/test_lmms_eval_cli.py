"""lmms-eval itself, run against the plugin: ``lmms-eval --model hf_kan ... --include_path "$(hf-kan lmms-tasks)"``
offline on CPU (one process and two under ``accelerate launch``), with answers, accuracy and efficiency figures equal
to the lmms-free runner's on the same samples; the model class inside lmms-eval's own registry."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap

import pytest
from hf_kan.eval import Runner, evaluate_task

LIMIT = 16
SETTING = "prune=fastv"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def include_path() -> str:
    """The folder ``hf-kan lmms-tasks`` prints."""
    import contextlib
    import io

    from hf_kan.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["lmms-tasks"]) == 0
    return out.getvalue().strip()


@pytest.fixture(scope="module")
def runner_result(tiny_llava_dir):
    runner = Runner.from_pretrained(str(tiny_llava_dir), batch_size=4)
    (result,) = evaluate_task(runner, "hf_kan_digits", [SETTING], limit=LIMIT)
    return result


def run_lmms_eval(command: list[str], out_dir, env: dict) -> tuple[dict, dict[int, str]]:
    """Run lmms-eval, fail on any error (it exits 0 on crashes, so ``--verbosity DEBUG`` makes them raise), and
    return (the task's aggregated results, {doc_id: answer})."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout[-4000:] + result.stderr[-6000:]
    assert result.returncode == 0, log
    assert "Error during evaluation" not in result.stdout + result.stderr, log
    (results_file,) = out_dir.rglob("*_results.json")
    (samples_file,) = out_dir.rglob("*_samples_hf_kan_digits.jsonl")
    answers = {}
    for line in samples_file.read_text().splitlines():
        row = json.loads(line)
        answers[row["doc_id"]] = row["filtered_resps"][0] if isinstance(row["filtered_resps"], list) else \
            row["filtered_resps"]
    return json.loads(results_file.read_text())["results"]["hf_kan_digits"], answers


def assert_same_as_runner(task_results: dict, answers: dict[int, str], runner_result) -> None:
    assert answers == {r["index"]: r["prediction"] for r in runner_result.samples}
    assert len(set(answers.values())) > 1  # answers differ between images: a real comparison
    for metric in ("answer_accuracy", "visual_tokens", "visual_tokens_kept", "visual_token_budget", "prefill_flops",
                   "kv_cache_bytes"):
        assert task_results[f"{metric},none"] == pytest.approx(runner_result.metrics[metric]), metric
    assert task_results["visual_tokens_kept,none"] == 8 and task_results["visual_tokens,none"] == 16


def lmms_args(tiny_llava_dir, include_path: str, out_dir) -> list[str]:
    return ["--model", "hf_kan", "--model_args", f"pretrained={tiny_llava_dir},{SETTING}",
            "--tasks", "hf_kan_digits", "--include_path", include_path, "--limit", str(LIMIT), "--batch_size", "4",
            "--verbosity", "DEBUG", "--output_path", str(out_dir), "--log_samples"]


@pytest.mark.slow
def test_lmms_eval_cli_equals_runner(lmms_python, tiny_llava_dir, include_path, runner_result, tmp_path):
    out = tmp_path / "lmms"
    task_results, answers = run_lmms_eval([str(lmms_python), "-m", "lmms_eval",
                                           *lmms_args(tiny_llava_dir, include_path, out)], out, _env())
    assert_same_as_runner(task_results, answers, runner_result)


@pytest.mark.slow
def test_lmms_eval_two_processes_equal_one(lmms_python, tiny_llava_dir, include_path, runner_result, tmp_path):
    out = tmp_path / "lmms2"
    command = [str(lmms_python), "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "lmms_eval",
               *lmms_args(tiny_llava_dir, include_path, out)]
    # lmms-eval creates its own Accelerator before any model: on CPU it needs ACCELERATE_USE_CPU to form a gloo group
    task_results, answers = run_lmms_eval(command, out, _env(ACCELERATE_USE_CPU="1"))
    assert_same_as_runner(task_results, answers, runner_result)


@pytest.mark.slow
def test_model_inside_lmms_eval_registry_and_loglikelihood(lmms_python, tiny_llava_dir, tmp_path):
    from hf_kan.eval import task_samples

    script = textwrap.dedent(f"""
        import json
        from lmms_eval.api.instance import Instance
        from lmms_eval.models import get_model
        from hf_kan.errors import HFKanConfigError, UnsupportedModelError
        from hf_kan.eval.lmms_model import HFKanLMMS
        from hf_kan.eval.tasks import digits_dataset

        assert get_model("hf_kan") is HFKanLMMS and get_model("hf-kan") is HFKanLMMS
        extra = {{"batch_size": 2, "max_batch_size": None, "device": None}}
        docs = digits_dataset("test").select(range(3))
        requests = [Instance(request_type="loglikelihood", idx=0, metadata={{"task": "t", "doc_id": i, "repeats": 1}},
                             arguments=("what digit is this ?", " " + docs[i]["answer"], lambda d: [d["image"]], i,
                                        "t", "test"))
                    for i in range(3)]
        out = {{}}
        lm = HFKanLMMS.create_from_arg_string("pretrained={tiny_llava_dir},prune=fastv", extra)
        lm.task_dict = {{"t": {{"test": docs}}}}
        try:
            lm.loglikelihood(requests)
        except UnsupportedModelError as err:
            out["refused"] = str(err)
        lm = HFKanLMMS.create_from_arg_string("pretrained={tiny_llava_dir},prune=false", extra)
        lm.task_dict = {{"t": {{"test": docs}}}}
        out["scores"] = lm.loglikelihood(requests)

        def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
            if round_idx == 2:  # two rounds, then the end
                return None, None, True, previous_output, None
            return [doc["image"]], "what digit is this ?", False, previous_output, None

        multi = Instance(request_type="generate_until_multi_round", idx=0,
                         metadata={{"task": "t", "doc_id": 1, "repeats": 1}},
                         arguments=("what digit is this ?", {{"max_new_tokens": 1, "until": ["\\n"]}},
                                    lambda d: [d["image"]], doc_to_text, 1, "t", "test"))
        out["multi"] = lm.generate_until_multi_round([multi])
        try:
            HFKanLMMS.create_from_arg_string("pretrained={tiny_llava_dir},pruning=fastv", extra)
        except HFKanConfigError as err:
            out["unknown"] = str(err)
        print("RESULT" + json.dumps(out))
    """)
    result = subprocess.run([str(lmms_python), "-c", script], env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    assert "prune" in out["refused"] and "generate_until" in out["refused"]
    assert "pruning" in out["unknown"]
    runner = Runner.from_pretrained(str(tiny_llava_dir), setting="off", batch_size=2)
    samples = task_samples("hf_kan_digits", limit=3)
    expected = runner.loglikelihood(samples, [" " + s.answer for s in samples])
    assert [(pytest.approx(s, abs=1e-5), g) for s, g in expected] == [tuple(x) for x in out["scores"]]
    answer = runner.generate(samples[1:2], max_new_tokens=1)[0].text
    assert out["multi"] == [[answer, answer]]
