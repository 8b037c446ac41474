"""The patches this hf-kan ships, registered in the order their runtimes run: one line per method folder.

Each method folder (``mma/``, ``var/``, ``prune/``, ``dyvte/``) declares one ``PatchSpec`` as ``SPEC`` in its
``__init__``; registering it here is all ``apply``, ``PatchConfig``, ``status`` and the command line need. A patch
that lives outside hf-kan registers itself the same way with :func:`register` (and leaves with :func:`unregister`).
"""

from __future__ import annotations

from . import dyvte, mma, prune, var
from .engine.spec import CliCommand, PatchSpec, cli_commands, names, register, spec_for, specs, unregister

register(mma.SPEC)
register(var.SPEC)
register(prune.SPEC)
register(dyvte.SPEC)

__all__ = ["CliCommand", "PatchSpec", "cli_commands", "names", "register", "spec_for", "specs", "unregister"]
