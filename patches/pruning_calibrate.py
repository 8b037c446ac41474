"""The ``calibrate-prune`` command: fit the positional trend of pruning's attention debiasing once per model.

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
from PIL import Image
from tqdm.auto import tqdm

from ..errors import HFKanConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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

    from .api import apply, status
    from .pruning import calibrate_trend

    model = AutoModelForImageTextToText.from_pretrained(args.model_dir).eval()
    processor = AutoProcessor.from_pretrained(args.model_dir)
    current = status(model)["patches"].get("prune") if hasattr(model.config, "get_text_config") else None
    prune = dict(current) if current else {"method": "fastv"}
    prune["debias"] = True
    apply(model, prune=prune)
    inputs = calibration_inputs(processor, calibration_images(args.images, args.num_images), args.prompt)
    b = calibrate_trend(model, inputs, store=True)
    print(f"positional trend of {args.model_dir}: T(i) = exp(-b i) with b = {b:.6g} "
          f"({len(inputs)} calibration images)")
    if args.save:
        model.config.save_pretrained(args.model_dir)
        print(f"stored prune={status(model)['patches']['prune']} in {args.model_dir}/config.json")
    return 0


def add_subparser(subparsers) -> None:
    """``hf-kan calibrate-prune MODEL_DIR [--images DIR] [--num-images N] [--prompt TEXT] [--save]``."""
    p = subparsers.add_parser(
        "calibrate-prune",
        help="fit the positional attention trend used to debias visual-token pruning (and store it in the config)",
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


__all__ = ["add_subparser", "calibration_images", "calibration_inputs"]
