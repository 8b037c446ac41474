"""Convert the authors' timm KAT checkpoints into a Transformers ``KATForImageClassification`` directory.

Usage: ``hf-kan convert-kat SRC OUT_DIR [--preset kat-tiny] [--num-heads N] [--labels FILE]`` or
:func:`convert_kat_checkpoint`. Nothing is downloaded: ``SRC`` is a local ``.pth`` / ``.pt`` / ``.bin``
(read with ``torch.load(weights_only=True)``) or ``.safetensors`` file. The state dict may be wrapped
in ``"model"`` / ``"state_dict"`` (and ``"module."``-prefixed by DDP).

The architecture is read from the tensor shapes (width, depth, patch and image size, MLP width, rational
groups and numerator sharing, qkv bias, classes); only the head count is not in the weights and comes
from ``--num-heads``, from ``--preset`` or from the published size with the same width. Every key and
shape is checked against the layout that architecture implies before anything is written; any mismatch
raises :class:`~hf_kan.errors.ConversionError` naming the keys.

Output: ``model.safetensors``, ``config.json``, ``preprocessor_config.json`` and ``README.md`` (model card). The
processor config names ``KATImageProcessor`` (timm's bicubic / crop 0.875 / ImageNet mean-std evaluation transform,
pixel for pixel): ``import hf_kan`` registers it with ``AutoImageProcessor`` for the PIL backend only, so
``AutoImageProcessor.from_pretrained(out_dir)`` reproduces the published preprocessing even where torchvision is
installed (see :mod:`.image_processing_kat`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ...errors import ConversionError, HFKanError
from ...hub import set_model_card_info
from ..presets import config_from_preset
from . import KAT_SIZES
from .configuration_kat import KATConfig
from .image_processing_kat import kat_image_processor
from .modeling_kat import KATForImageClassification, KATModel

logger = logging.get_logger(__name__)

WRAPPER_KEYS = ("model", "state_dict")
EMA_WRAPPER_KEYS = ("state_dict_ema", "model_ema")
# Published checkpoints (timm default_cfgs of the KAT repo): file-name hash prefix -> published size.
PUBLISHED_HASHES = {"1f3ad3b2": "kat-tiny", "32487885": "kat-small", "abff874d": "kat-base"}
# ImageNet-1K top-1 (%) reported in the paper for the from-scratch models.
REPORTED_TOP1 = {"kat-tiny": 74.6, "kat-small": 81.2, "kat-base": 82.3}
# Fields of the architecture that the weights determine; a preset or config given by the user must agree.
ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "patch_size",
    "image_size",
    "num_channels",
    "qkv_bias",
    "rational_groups",
    "rational_shared_numerator",
)

_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    ("norm1", "norm1"),
    ("attn.qkv", "attention.qkv"),
    ("attn.proj", "attention.proj"),
    ("norm2", "norm2"),
    ("mlp.act1", "mlp.rational_1"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.act2", "mlp.rational_2"),
    ("mlp.fc2", "mlp.fc2"),
)


def load_timm_state_dict(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict (no network, no pickle execution).

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    (``argparse.Namespace`` allowed, for the ``"args"`` entry of timm training checkpoints).
    Wrappers ``"model"`` / ``"state_dict"`` (or, with ``use_ema``, ``"state_dict_ema"`` / ``"model_ema"``)
    are unwrapped, and a ``"module."`` prefix on every key is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {str(path)!r} does not exist (the converter reads local files only)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            # timm training checkpoints also hold the run's argparse.Namespace ("args"); allow that one plain
            # attribute container, nothing else
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refused or corrupt file: say what to do
            raise ConversionError(
                f"could not read {str(path)!r} with torch.load(weights_only=True): {exc}. The converter only reads "
                "plain tensor state dicts; re-save the checkpoint with torch.save(model.state_dict(), ...) or as "
                ".safetensors"
            ) from exc
    return unwrap_state_dict(obj, use_ema=use_ema)


def unwrap_state_dict(obj: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Descend through ``"model"`` / ``"state_dict"`` wrappers to the tensor dict; strip a ``"module."`` prefix."""
    wrappers = (EMA_WRAPPER_KEYS + WRAPPER_KEYS) if use_ema else WRAPPER_KEYS
    while isinstance(obj, Mapping):
        key = next((k for k in wrappers if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"checkpoint holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in obj if k not in tensors)
    if not tensors:
        raise ConversionError(
            f"checkpoint has no tensors at the top level or under {list(wrappers)}; top-level keys: {others[:10]}"
        )
    if others:
        logger.warning("ignoring %d non-tensor checkpoint entries: %s", len(others), others[:10])
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _describe_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    sample = sorted(state_dict)[:8]
    return f"{len(state_dict)} tensors, e.g. {sample}"


def _check_is_timm_kat(state_dict: Mapping[str, torch.Tensor]) -> None:
    if "kat.embeddings.cls_token" in state_dict or "embeddings.cls_token" in state_dict:
        raise ConversionError(
            "this checkpoint is already in the hf-kan (Transformers) layout; load it with "
            "KATForImageClassification.from_pretrained instead of converting it"
        )
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ConversionError(
            f"not a timm KAT/ViT layout: missing {missing}. Expected keys such as cls_token, pos_embed, "
            f"patch_embed.proj.*, blocks.{{i}}.attn.qkv.*, blocks.{{i}}.mlp.act1.weight_numerator; found "
            f"{_describe_layout(state_dict)}"
        )
    if "blocks.0.mlp.act1.weight_numerator" not in state_dict:
        raise ConversionError(
            "this is a timm ViT checkpoint without GR-KAN rationals (no blocks.{i}.mlp.act1/act2.weight_numerator); "
            "only KAT checkpoints can be converted"
        )


def infer_kat_config(
    state_dict: Mapping[str, torch.Tensor],
    preset: str | None = None,
    **overrides: Any,
) -> KATConfig:
    """Build the :class:`KATConfig` a timm KAT state dict describes.

    Shapes give every architectural field except the head count, which comes from ``overrides``
    (``num_attention_heads``), else from ``preset``, else from the published size of the same width.
    With ``preset``, its architecture must agree with the weights (else :class:`ConversionError`).
    Other ``overrides`` (e.g. ``id2label``, ``rational_2_init``) are passed to the config.
    """
    _check_is_timm_kat(state_dict)
    patch_w = state_dict["patch_embed.proj.weight"]
    if patch_w.dim() != 4 or patch_w.shape[-1] != patch_w.shape[-2]:
        raise ConversionError(f"patch_embed.proj.weight must be a square conv kernel, got {tuple(patch_w.shape)}")
    hidden, channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[-1]
    num_pos = state_dict["pos_embed"].shape[1] - 1
    grid = math.isqrt(num_pos)
    if grid * grid != num_pos:
        raise ConversionError(f"pos_embed has {num_pos} patch positions, not a square grid (plus a class token)")
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    layers = max(block_ids) + 1
    if block_ids != set(range(layers)):
        raise ConversionError(f"block indices are not contiguous: missing {sorted(set(range(layers)) - block_ids)}")
    numerator = state_dict["blocks.0.mlp.act1.weight_numerator"]
    denominator_key = "blocks.0.mlp.act1.weight_denominator"
    if denominator_key not in state_dict:
        raise ConversionError(f"missing key {denominator_key!r} (the per-group rational denominator)")
    fc1_key = "blocks.0.mlp.fc1.weight"
    if fc1_key not in state_dict:
        raise ConversionError(f"missing key {fc1_key!r}")
    inferred: dict[str, Any] = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=state_dict[fc1_key].shape[0],
        patch_size=patch,
        image_size=grid * patch,
        num_channels=channels,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        rational_groups=state_dict[denominator_key].shape[0],
        rational_shared_numerator=numerator.shape[0] == 1,
        num_labels=state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0,
    )
    if preset is not None:
        base = config_from_preset(preset)
        if not isinstance(base, KATConfig):
            raise ConversionError(f"preset {preset!r} is not a KAT preset")
        mismatches = {f: (getattr(base, f), inferred[f]) for f in ARCH_FIELDS if getattr(base, f) != inferred[f]}
        if mismatches:
            detail = ", ".join(f"{f}: preset {p!r} vs checkpoint {c!r}" for f, (p, c) in mismatches.items())
            raise ConversionError(f"checkpoint does not match preset {preset!r}: {detail}")
        inferred["num_attention_heads"] = base.num_attention_heads
    if "num_attention_heads" in overrides:
        inferred["num_attention_heads"] = overrides.pop("num_attention_heads")
    if "num_attention_heads" not in inferred:
        match = [name for name, (d, _, _) in KAT_SIZES.items() if d == hidden]
        if not match:
            raise ConversionError(
                f"cannot infer the number of attention heads for hidden size {hidden} (not a published KAT width); "
                "pass num_attention_heads / --num-heads"
            )
        inferred["num_attention_heads"] = KAT_SIZES[match[0]][2]
    inferred.update(overrides)
    try:
        return KATConfig(**inferred)
    except ValueError as exc:
        raise ConversionError(f"the checkpoint's architecture is not a valid KAT config: {exc}") from exc


def hf_key(timm_key: str) -> str | None:
    """The Transformers parameter name of a timm KAT key (``None`` if the key has no counterpart)."""
    fixed = {
        "cls_token": "kat.embeddings.cls_token",
        "pos_embed": "kat.embeddings.position_embeddings",
        "patch_embed.proj.weight": "kat.embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "kat.embeddings.patch_embeddings.projection.bias",
        "norm.weight": "kat.layernorm.weight",
        "norm.bias": "kat.layernorm.bias",
        "head.weight": "classifier.weight",
        "head.bias": "classifier.bias",
    }
    if timm_key in fixed:
        return fixed[timm_key]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|weight_numerator|weight_denominator)", timm_key)
    if m is None:
        return None
    index, module, param = m.groups()
    for timm_name, hf_name in _BLOCK_RULES:
        if module == timm_name:
            return f"kat.layers.{index}.{hf_name}.{param}"
    return None


def convert_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: KATForImageClassification | KATModel
) -> dict[str, torch.Tensor]:
    """Rename a timm KAT state dict to ``model``'s parameter names, checking every key and shape.

    Raises :class:`ConversionError` listing unexpected keys (no counterpart in the model), missing keys
    (model parameters the checkpoint lacks) and shape mismatches. ``model`` may be a bare ``KATModel``
    (then the checkpoint must have no ``head``).
    """
    bare = isinstance(model, KATModel)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    shape_errors: list[str] = []
    seen: set[str] = set()
    for key, tensor in state_dict.items():
        name = hf_key(key)
        if name is not None and bare:
            name = name[len("kat.") :] if name.startswith("kat.") else None
        if name is None or name not in expected:
            unexpected.append(key)
            continue
        seen.add(name)
        if tuple(tensor.shape) != tuple(expected[name]):
            shape_errors.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name])}")
            continue
        converted[name] = tensor
    missing = sorted(set(expected) - seen)
    if unexpected or missing or shape_errors:
        def show(items: list[str]) -> str:
            return f"{len(items)}: {items[:10]}" + (" ..." if len(items) > 10 else "")

        parts = []
        if unexpected:
            parts.append(f"unexpected keys (no counterpart in KAT) {show(sorted(unexpected))}")
        if missing:
            parts.append(f"missing (model parameters not in the checkpoint) {show(missing)}")
        if shape_errors:
            parts.append(f"shape mismatches {show(shape_errors)}")
        raise ConversionError(
            "the checkpoint does not match the timm KAT layout for the inferred architecture; "
            + "; ".join(parts)
            + ". If the checkpoint is a KAT variant with extra modules (layer scale, registers, qk-norm), it is "
            "not supported."
        )
    return converted


def _published_size(src: Path, config: KATConfig) -> str | None:
    """The published model ``src`` is, if its file name carries a published hash and its shapes match that size."""
    for prefix, name in PUBLISHED_HASHES.items():
        if prefix in src.name:
            d, layers, heads = KAT_SIZES[name]
            if (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size,
                    config.num_labels) == (d, layers, heads, 224, 1000):
                return name
    return None


def convert_kat_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    *,
    preset: str | None = None,
    labels: list[str] | None = None,
    use_ema: bool = False,
    model_name: str | None = None,
    license: str = "mit",
    **config_overrides: Any,
) -> KATForImageClassification | KATModel:
    """Convert the timm KAT checkpoint ``src`` and write a Transformers model directory ``out_dir``.

    ``preset`` / ``config_overrides`` (e.g. ``num_attention_heads``): see :func:`infer_kat_config`.
    ``labels``: class names, one per output of the head (sets ``id2label``). Returns the converted model
    (``KATForImageClassification``, or ``KATModel`` for a checkpoint without ``head``).
    """
    src = Path(src)
    state_dict = load_timm_state_dict(src, use_ema=use_ema)
    if labels is not None:
        config_overrides["id2label"] = dict(enumerate(labels))
    config = infer_kat_config(state_dict, preset=preset, **config_overrides)
    if labels is not None and len(labels) != config.num_labels:
        raise ConversionError(f"{len(labels)} labels given but the checkpoint's head has {config.num_labels} outputs")
    model_cls = KATForImageClassification if config.num_labels > 0 else KATModel
    config.architectures = [model_cls.__name__]
    model = model_cls(config)
    converted = convert_timm_state_dict(state_dict, model)
    model.load_state_dict(converted, strict=True)
    model.eval()

    published = _published_size(src, config)
    set_model_card_info(
        model,
        model_name=model_name or (f"{published}-patch16-224" if published else src.stem),
        converted_from=src.name,
        license=license,
        tags=["kolmogorov-arnold", "timm-converted"],
    )
    if published:
        set_model_card_info(
            model,
            metrics={"accuracy": REPORTED_TOP1[published]},
            metrics_dataset="imagenet-1k",
            metrics_source="top-1 (%) reported by the authors (arXiv 2409.10594), not re-measured by hf-kan",
            metrics_source_url="https://arxiv.org/abs/2409.10594",
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    kat_image_processor(config.image_size).save_pretrained(out_dir)
    logger.info("converted %s -> %s (%s, %d parameters)", src, out_dir, model_cls.__name__,
                sum(p.numel() for p in model.parameters()))
    return model


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.num_heads is not None:
        overrides["num_attention_heads"] = args.num_heads
    if args.rational_2_init is not None:
        overrides["rational_2_init"] = args.rational_2_init
    labels = None
    if args.labels:
        text = Path(args.labels).read_text(encoding="utf-8")
        labels = json.loads(text) if args.labels.endswith(".json") else [ln for ln in text.splitlines() if ln.strip()]
    try:
        model = convert_kat_checkpoint(
            args.src,
            args.out_dir,
            preset=args.preset,
            labels=labels,
            use_ema=args.use_ema,
            model_name=args.model_name,
            license=args.license,
            **overrides,
        )
    except HFKanError as exc:
        print(f"hf-kan convert-kat: error: {exc}", file=sys.stderr)
        return 1
    cfg = model.config
    print(
        f"wrote {args.out_dir}: {type(model).__name__}, D={cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads, {cfg.image_size}px/patch {cfg.patch_size}, {cfg.num_labels} labels, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; preprocessor_config.json: KATImageProcessor "
        "(timm's evaluation transform, PIL backend)"
    )
    return 0


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-kan convert-kat``."""
    parser = subparsers.add_parser(
        "convert-kat",
        help="convert a timm KAT checkpoint (.pth/.bin/.safetensors) to a Transformers model directory",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("src", help="local checkpoint file (.pth, .pt, .bin or .safetensors)")
    parser.add_argument("out_dir", help="output directory (created if needed)")
    parser.add_argument("--preset", help="KAT preset the checkpoint must match (kat-tiny, kat-small, kat-base)")
    parser.add_argument("--num-heads", type=int, help="attention heads (not stored in the weights)")
    parser.add_argument("--rational-2-init", help="preset name recorded as rational_2's init (default: swish)")
    parser.add_argument("--labels", help="class names: a text file with one per line, or a JSON list")
    parser.add_argument("--use-ema", action="store_true", help="convert the EMA weights of a training checkpoint")
    parser.add_argument("--model-name", help="name used in the model card")
    parser.add_argument("--license", default="mit", help="license of the converted weights (default: mit)")
    parser.set_defaults(func=_run)


__all__ = [
    "convert_kat_checkpoint",
    "convert_timm_state_dict",
    "hf_key",
    "infer_kat_config",
    "load_timm_state_dict",
    "unwrap_state_dict",
]
