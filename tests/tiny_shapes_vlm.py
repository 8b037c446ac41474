"""A tiny Shapes VQA model, trained for a few steps and packaged by ``hf-kan vlm-package``, shared by the tests of
``hf-kan vlm-package`` and ``hf-kan eval`` (built once per test process)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

TINY_SHAPE = dict(patch_size=16, vision_hidden_size=32, vision_layers=1, vision_heads=2, text_hidden_size=64,
                  text_layers=4, text_heads=4, text_kv_heads=2)
PACKAGE_OPTIONS = dict(calibration_images=8, router_train_samples=64, router_eval_samples=16, reference_limit=20)


@functools.lru_cache(maxsize=1)
def packaged_tiny_model(root: str) -> tuple[Path, Path, dict]:
    """``(trained_dir, packaged_dir, package_report)`` under ``root``: a 4-layer tiny model trained 40 steps on
    every question type (it answers with the words of each type's answer prior and has started counting), then
    packaged with small calibration sizes."""
    import torch

    from hf_kan.vlm.package import package_model
    from hf_kan.vlm.train import VLMTrainingArguments, train_vlm

    saved = os.environ.get("HF_KAN_RATIONAL_CPU_COMPILE")
    os.environ["HF_KAN_RATIONAL_CPU_COMPILE"] = "0"  # the compiled path is tested elsewhere; compiling costs minutes
    threads = torch.get_num_threads()
    try:
        trained = Path(root) / "trained"
        train_vlm(VLMTrainingArguments(
            output_dir=str(trained), train_size=640, validation_size=50, test_size=50, max_steps=40, eval_steps=40,
            batch_size=16, eval_batch_size=50, learning_rate=3e-3, warmup_steps=5, curriculum="", describe=False,
            num_threads=1, progress_bar=False, **TINY_SHAPE,
        ))
        report = package_model(trained, Path(root) / "packaged", **PACKAGE_OPTIONS)
    finally:
        torch.set_num_threads(threads)
        if saved is None:
            os.environ.pop("HF_KAN_RATIONAL_CPU_COMPILE", None)
        else:
            os.environ["HF_KAN_RATIONAL_CPU_COMPILE"] = saved
    return trained, Path(root) / "packaged", report
