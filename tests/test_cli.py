"""The ``hf-kan`` command line: a lazy command table, clean help texts, ``--version``, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

import hf_kan
from hf_kan.cli import COMMANDS, build_parser, main, plain_text

HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate", "hf_kan.patches", "hf_kan.models")


def loaded_after(argv: list[str]) -> dict:
    """Run ``hf-kan ARGV`` in a fresh interpreter; its exit code, output and which heavy modules it imported."""
    code = (
        "import json, sys\n"
        "from hf_kan.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules],"
        " 'hf_kan': sorted(m for m in sys.modules if m.startswith('hf_kan.'))}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["output"] = result.stdout
    return report


def test_top_level_help_lists_every_command_without_importing_any():
    report = loaded_after(["--help"])
    assert report["code"] == 0 and report["heavy"] == []
    assert not any(module in report["hf_kan"] for module, _ in COMMANDS.values())
    for name, (_, help_text) in COMMANDS.items():
        assert name in report["output"]
        assert " ".join(help_text.split()[:4]) in " ".join(report["output"].split())


@pytest.mark.parametrize("command", ["train", "demo", "moh-tune"])
def test_command_help_imports_only_that_command(command):
    report = loaded_after([command, "--help"])
    assert report["code"] == 0 and "--output-dir" in report["output"]
    # torch may load (the trainers' argument defaults live next to torch code); the libraries do not
    assert [m for m in report["heavy"] if m != "torch"] == []
    uses = {"demo": {"train"}}.get(command, set())  # the demo trains with the train command's trainer
    others = [module for name, (module, _) in COMMANDS.items() if name != command and name not in uses]
    assert not any(module in report["hf_kan"] for module in others)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"hf-kan {hf_kan.__version__}"


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action, action.choices[name]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_module_registers_its_table_entry_with_a_clean_help(name, capsys):
    action, parser = _subparser(name)
    registered = {choice.dest: choice.help for choice in action._choices_actions}
    assert registered[name] == COMMANDS[name][1]  # the table and the module agree
    assert parser.description, f"{name} has no description"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and text.startswith(f"usage: hf-kan {name}")
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_plain_text_strips_restructured_text():
    assert plain_text("see ``accelerate launch`` and :func:`hf_kan.x`, :class:`~a.B`") == (
        "see accelerate launch and hf_kan.x, a.B"
    )


def test_max_grad_norm_help_says_how_to_turn_clipping_off(capsys):
    _, parser = _subparser("train")
    parser.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-grad-norm MAX_GRAD_NORM clip the global gradient norm to this value; 0 turns clipping off " \
           "(default: 1.0)" in text  # fmt: skip


def test_errors_are_one_line_with_exit_code_1(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out"),
                 "--no-progress-bar"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("hf-kan train: error: ") and "neither a registered preset" in err
    assert "Traceback" not in err


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["hf_kan.train.image_classification", "hf_kan.moh.train"])
def test_python_dash_m_entry_points_run_without_runtime_warning(module):
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RuntimeWarning" not in result.stderr and "--output-dir" in result.stdout
