"""The ``lmms_eval.models`` entry point of hf-kan: :func:`manifests` tells lmms-eval about ``--model hf_kan``.

lmms-eval loads every plugin's entry point inside one ``try`` at import time, so a plugin that raises hides all
plugins. :func:`manifests` therefore never raises: it imports nothing of hf-kan, and if lmms-eval's manifest type is
missing or rejects the arguments it logs a warning and registers nothing. The model class itself
(``hf_kan.eval.lmms_model.HFKanLMMS``) is imported only when ``--model hf_kan`` is requested.
"""

from __future__ import annotations

import logging

MODEL_ID = "hf_kan"
MODEL_CLASS = "hf_kan.eval.lmms_model.HFKanLMMS"
ALIASES = ("hf-kan",)


def manifests() -> list:
    """``[ModelManifest("hf_kan", simple_class_path=MODEL_CLASS, aliases=("hf-kan",))]``, or ``[]`` (with a logged
    warning) when that cannot be built with the installed lmms-eval. Never raises."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest

        return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS, aliases=ALIASES)]
    except Exception as exc:  # noqa: BLE001 - by contract: one failing plugin would hide every lmms-eval plugin
        try:
            logging.getLogger(__name__).warning("hf-kan: lmms-eval model 'hf_kan' not registered: %r", exc)
        except Exception:  # noqa: BLE001
            pass
        return []


__all__ = ["ALIASES", "MODEL_CLASS", "MODEL_ID", "manifests"]
