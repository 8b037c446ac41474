"""Which runtime implements which patch (name in the config -> ``PatchRuntime`` subclass).

A new patch adds one line here (and its config dataclass in ``config.py``)."""

from __future__ import annotations

from .config import PatchConfig
from .dyvte import DyVTERuntime
from .mma import MMARuntime
from .pruning import PruneRuntime
from .runtime import PatchRuntime
from .var import VARRuntime

RUNTIMES: dict[str, type[PatchRuntime]] = {"mma": MMARuntime, "var": VARRuntime, "prune": PruneRuntime,
                                           "dyvte": DyVTERuntime}


def runtimes_for(config: PatchConfig) -> list[PatchRuntime]:
    """Fresh runtimes of the active patches, in registry order (one set per forward)."""
    return [RUNTIMES[name](getattr(config, name)) for name in RUNTIMES if getattr(config, name) is not None]


__all__ = ["RUNTIMES", "runtimes_for"]
