"""The ``hf-kan`` command line.

``COMMANDS`` maps each subcommand to the module that implements it and a one-line help, so ``hf-kan --help``
lists every command without importing any of them; a command's module is imported only when that command (or its
``--help``) runs. The module defines ``add_subparser(subparsers)``, which adds the command's parser (same name and
help as in ``COMMANDS``) and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit
code). Adding a command is one entry in ``COMMANDS``.

Errors hf-kan raises on purpose (:class:`hf_kan.errors.HFKanError`) end the command with one line on stderr and
exit code 1; anything else propagates with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence

from . import __version__
from .errors import HFKanError

# command -> (module defining add_subparser, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "hf_kan.train.image_classification",
        "train an image classifier (any registered backbone) on a datasets data set or the embedded digits",
    ),
    "demo": (
        "hf_kan.train.demo",
        "train a small KAT and the same-size ViT on the embedded digits and compare them",
    ),
    "convert-kat": (
        "hf_kan.models.kat.convert_kat_timm",
        "convert a timm KAT checkpoint (.pth/.bin/.safetensors) to a Transformers model directory",
    ),
    "moh-tune": (
        "hf_kan.moh.train",
        "continue-tune a causal LM into Mixture-of-Head attention (a PEFT adapter)",
    ),
    "calibrate-prune": (
        "hf_kan.patches.prune.calibrate",
        "fit the positional attention trend used to debias visual-token pruning (and store it in the config)",
    ),
    "calibrate-var": (
        "hf_kan.patches.var.cli",
        "find VAR's sink dimensions of a saved multimodal model (and store them in its config)",
    ),
    "dyvte-train": ("hf_kan.patches.dyvte.train", "train DyVTE exit routers on a frozen VLM"),
    "vlm-train": (
        "hf_kan.vlm.train",
        "train the Shapes VQA vision-language model (LLaVA with a KAT or ViT tower) from scratch",
    ),
    "vlm-package": (
        "hf_kan.vlm.package",
        "calibrate a trained Shapes VQA model (debias trend, VAR sink dims, DyVTE routers) and ship it",
    ),
    "eval": (
        "hf_kan.eval.patch_report",
        "evaluate a VLM (default: the shipped one) under each patch: accuracy, tokens, FLOPs, latency",
    ),
    "lmms-tasks": ("hf_kan.eval.tasks", "print the folder of hf-kan's lmms-eval tasks (for --include_path)"),
    "push": ("hf_kan.hub", "upload a saved hf-kan model, patched VLM or MoH adapter with its model card"),
}

_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str) -> str:
    """``text`` with reStructuredText inline markup (````x````, ``:func:`x```) reduced to the plain ``x``."""
    return _RST_LITERAL.sub(r"\1", _RST_ROLE.sub(r"\1", text))


class HelpFormatter(argparse.HelpFormatter):
    """Prints descriptions and option help without reStructuredText markup (docstrings feed some of them)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))


class DefaultsHelpFormatter(HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """:class:`HelpFormatter` that also ends each option's help with its default."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first argument that is not an option), or ``None``."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``hf-kan`` parser. Only ``command``'s module is imported and its options added; every other command
    is listed with its one-line help."""
    parser = _Parser(
        prog="hf-kan",
        description="Kolmogorov-Arnold vision backbones, multimodal attention patches and Mixture-of-Head "
        "attention for Hugging Face Transformers.",
        epilog="Run 'hf-kan COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module_name).add_subparser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


class _ProgressBarSafeHandler(logging.StreamHandler):
    """Writes records on their own line above any tqdm progress bar (``tqdm.write``) instead of into it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging() -> None:
    """Show hf-kan's INFO messages (progress notes such as a kernel compilation) on stderr, once per process."""
    root = logging.getLogger("hf_kan")
    if not root.handlers:
        handler = _ProgressBarSafeHandler()
        handler.setFormatter(logging.Formatter("[hf-kan] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def run_command(prog: str, args: argparse.Namespace) -> int:
    """Run ``args.func(args)`` with hf-kan's INFO messages shown; an :class:`HFKanError` becomes one
    ``<prog>: error: ...`` line on stderr and exit code 1."""
    configure_logging()
    try:
        return int(args.func(args) or 0)
    except HFKanError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-kan`` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_in(argv)
    if command is not None and command not in COMMANDS:
        command = None  # argparse reports the invalid choice
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return run_command(f"hf-kan {args.command}", args)


if __name__ == "__main__":
    sys.exit(main())
