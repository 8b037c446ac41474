"""The ``hf-kan`` command line.

Each subcommand lives in the module that implements it; that module defines
``add_subparser(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code). Adding a
command is one line in ``SUBCOMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "hf_kan.models.kat.convert_kat_timm",
    "hf_kan.moh.train",
    "hf_kan.patches.dyvte_train",
    "hf_kan.patches.pruning_calibrate",
    "hf_kan.patches.var_calibrate",
    "hf_kan.train.image_classification",
    "hf_kan.train.demo",
    "hf_kan.vlm.train",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="hf-kan", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_subparser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-kan`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
