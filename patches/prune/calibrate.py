"""Fitting the positional trend of pruning's attention debiasing once per model: ``calibrate_trend`` and the
``calibrate-prune`` command.

``calibrate_trend(model, inputs_list)`` collects the un-debiased visual-token scores of a few calibration inputs
(``collect_scores``: pruning probed at keep ratio 1), fits ``b`` with ``debias.fit_trend`` and stores it through the
public ``apply``; nothing on the path of ``apply`` imports this module.

``hf-kan calibrate-prune MODEL_DIR [--images DIR] [--num-images N] [--prompt TEXT] [--save]`` loads a saved
multimodal model and its processor, builds one chat prompt per calibration image (the images of ``--images``, or by
default the embedded scikit-learn digits, which need no download), runs ``hf_kan.patches.calibrate_trend`` with the
model's pruning configuration (FastV at layer 2 if none is stored) and, with ``--save``, writes the fitted ``b`` into
the model's ``config.json`` (``hf_kan.prune.trend``, with ``debias`` on). Calibrate on data other than your
evaluation set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ...errors import HFKanConfigError, InputLayoutError
from ..api import apply, status
from ..engine.config import CONFIG_ATTRIBUTE, PatchConfig
from ..engine.spec import cli_help
from .config import PruneConfig
from .debias import fit_trend

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def collect_scores(model: nn.Module, inputs_list, stage: int = 0) -> list[torch.Tensor]:
    """Per sample, the (un-debiased) stage-``stage`` scores of its visual tokens in visual order, from one forward per
    element of ``inputs_list`` with pruning configured as on ``model`` but keeping every token."""
    text_config = model.config.get_text_config()
    saved = getattr(text_config, CONFIG_ATTRIBUTE, None)
    cfg = PatchConfig.from_dict(saved)
    if cfg.prune is None:
        raise InputLayoutError("collect_scores needs pruning configured on the model: apply(model, prune=...) first")
    probe = PruneConfig(layers=cfg.prune.layers, keep_ratios=(1.0,) * len(cfg.prune.layers), scorer=cfg.prune.scorer,
                        score_layer=cfg.prune.score_layer, method="custom")
    out: list[torch.Tensor] = []
    try:
        apply(model, prune=probe)
        for inputs in inputs_list:
            with torch.no_grad():
                res = model(**inputs, use_cache=False)
            state = res.hf_kan_state
            by_col = state.scratch["prune"]["scores"][stage]
            vis = state.layout.visual
            out.extend(by_col[b][vis[b].to(by_col.device)].cpu() for b in range(vis.shape[0]) if bool(vis[b].any()))
    finally:
        setattr(text_config, CONFIG_ATTRIBUTE, saved)
    return out


def calibrate_trend(model: nn.Module, inputs_list, stage: int = 0, store: bool = True) -> float:
    """Fit the positional trend ``b`` of ``T(i) = exp(-b i)`` for ``model`` on a handful of calibration inputs (a list
    of model-input dicts; a few dozen images suffice) with ``debias.fit_trend`` on the stage-``stage`` scores. With
    ``store`` the value is written into the model's pruning config (``prune.trend``, replacing a ``multiplier_b``),
    so ``save_pretrained`` keeps it. Recency makes ``b`` negative (``prune.multiplier_b`` would be ``-b``). Use
    calibration data, never the evaluation set."""
    b = fit_trend(collect_scores(model, inputs_list, stage))
    if store:
        cfg = PatchConfig.from_dict(getattr(model.config.get_text_config(), CONFIG_ATTRIBUTE, None)).prune
        apply(model, prune=PruneConfig(**{**cfg.to_dict(), "trend": b, "multiplier_b": None}))
    return b


def calibration_images(directory: str | None, num: int) -> list[Image.Image]:
    """Up to ``num`` RGB images from ``directory``, or the first ``num`` embedded digits (8x8, upscaled to 64 px)."""
    if directory is not None:
        paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:num]
        if not paths:
            raise HFKanConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {directory}")
        return [Image.open(p).convert("RGB") for p in paths]
    from sklearn.datasets import load_digits

    raw = load_digits().images[:num]
    pixels = np.rint(raw * (255.0 / 16.0)).astype(np.uint8)
    return [Image.fromarray(p).convert("RGB").resize((64, 64), Image.BILINEAR) for p in pixels]


def calibration_inputs(processor, images: list[Image.Image], prompt: str) -> list[dict]:
    """One model-input dict per image: the processor's chat template around ``[image, prompt]``."""
    if getattr(processor, "chat_template", None) is None:
        raise HFKanConfigError("the processor has no chat template; save the model's processor with one")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return [dict(processor(images=img, text=text, return_tensors="pt")) for img in tqdm(images, desc="inputs")]


def _run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model_dir).eval()
    processor = AutoProcessor.from_pretrained(args.model_dir)
    current = status(model)["patches"].get("prune") if hasattr(model.config, "get_text_config") else None
    prune = dict(current) if current else {"method": "fastv"}
    prune["debias"] = True
    apply(model, prune=prune)
    inputs = calibration_inputs(processor, calibration_images(args.images, args.num_images), args.prompt)
    b = calibrate_trend(model, inputs, store=True)
    print(f"positional trend of {args.model_dir}: T(i) = exp(-b i) with b = {b:.6g} "
          f"({len(inputs)} calibration images; the paper's multiplier form is multiplier_b = {-b:.6g})")
    if args.save:
        model.config.save_pretrained(args.model_dir)
        print(f"stored prune={status(model)['patches']['prune']} in {args.model_dir}/config.json")
    return 0


def add_subparser(subparsers) -> None:
    """``hf-kan calibrate-prune MODEL_DIR [--images DIR] [--num-images N] [--prompt TEXT] [--save]``."""
    p = subparsers.add_parser(
        "calibrate-prune",
        help=cli_help("calibrate-prune"),
        description="Fit b of T(i) = exp(-b i), the positional trend of the visual-token scores of a saved LLaVA / "
                    "LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL model, on a handful of calibration images; with --save, "
                    "store it (and debias=true) in the model's config.json.",
    )
    p.add_argument("model_dir", help="a directory written by save_pretrained (model and processor)")
    p.add_argument("--images", default=None, help="a directory of calibration images (default: embedded digits)")
    p.add_argument("--num-images", type=int, default=16, help="how many calibration images (default 16)")
    p.add_argument("--prompt", default="Describe the image.", help="the instruction after each image")
    p.add_argument("--save", action="store_true", help="write the fitted trend into the model's config.json")
    p.set_defaults(func=_run)


__all__ = ["add_subparser", "calibrate_trend", "calibration_images", "calibration_inputs", "collect_scores"]
