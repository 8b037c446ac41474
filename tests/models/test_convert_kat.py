"""timm KAT checkpoint converter: logits equal an independent forward from the raw timm keys; clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hf_kan.cli import main as cli_main
from hf_kan.errors import ConversionError
from hf_kan.models.kat import KATForImageClassification, KATModel
from hf_kan.models.kat.convert_kat_timm import convert_kat_checkpoint, infer_kat_config, load_timm_state_dict

D, LAYERS, HEADS, PATCH, IMAGE, CLASSES, GROUPS = 32, 2, 2, 8, 32, 7, 8


def synthetic_timm_state_dict(shared_numerator: bool = True, head: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors with the key layout and shapes of the authors' timm KAT (tiny sizes)."""
    gen = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    hidden = 4 * D
    grid = IMAGE // PATCH
    sd = {
        "cls_token": rnd(1, 1, D),
        "pos_embed": rnd(1, grid * grid + 1, D),
        "patch_embed.proj.weight": rnd(D, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rnd(D),
        "norm.weight": 1 + rnd(D),
        "norm.bias": rnd(D),
    }
    if head:
        sd["head.weight"] = rnd(CLASSES, D)
        sd["head.bias"] = rnd(CLASSES)
    for i in range(LAYERS):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + rnd(D), b + "norm1.bias": rnd(D),
            b + "attn.qkv.weight": rnd(3 * D, D), b + "attn.qkv.bias": rnd(3 * D),
            b + "attn.proj.weight": rnd(D, D), b + "attn.proj.bias": rnd(D),
            b + "norm2.weight": 1 + rnd(D), b + "norm2.bias": rnd(D),
            b + "mlp.fc1.weight": rnd(hidden, D), b + "mlp.fc1.bias": rnd(hidden),
            b + "mlp.fc2.weight": rnd(D, hidden, scale=0.1), b + "mlp.fc2.bias": rnd(D),
        })
        for act in ("act1", "act2"):
            rows = 1 if shared_numerator else GROUPS
            sd[b + f"mlp.{act}.weight_numerator"] = torch.tensor([[0.0, 1.0, 0.3, 0.05, 0.01, 0.002]]).repeat(
                rows, 1) + rnd(rows, 6, scale=0.01)
            sd[b + f"mlp.{act}.weight_denominator"] = rnd(GROUPS, 4, scale=0.3)  # signed, as trained
    return sd


def timm_rational(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """KAT_Group forward from the published formula: per contiguous group, P(x) / (1 + sum |b_i| |x|^i)."""
    c = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], GROUPS, c // GROUPS)  # [..., G, C/G]
    num = num.expand(GROUPS, 6)
    p = sum(num[:, i, None] * xg**i for i in range(6))
    q = 1 + sum(den[:, i - 1, None].abs() * xg.abs() ** i for i in range(1, 5))
    return (p / q).reshape(x.shape)


def timm_forward(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """The timm KAT forward written directly from the raw checkpoint keys (eager attention, float64)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(pixels.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(LAYERS):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        bsz, n, _ = qkv.shape
        q, k, v = qkv.reshape(bsz, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(D // HEADS)).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(bsz, n, D)
        x = x + F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = timm_rational(h, sd[b + "mlp.act1.weight_numerator"], sd[b + "mlp.act1.weight_denominator"])
        h = F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])
        h = timm_rational(h, sd[b + "mlp.act2.weight_numerator"], sd[b + "mlp.act2.weight_denominator"])
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    x = F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize(
    ("fmt", "shared"), [("pth-model", True), ("pth-state_dict", False), ("safetensors", True)]
)
def test_converted_logits_equal_independent_timm_forward(tmp_path, fmt, shared):
    sd = synthetic_timm_state_dict(shared_numerator=shared)
    if fmt == "safetensors":
        src = tmp_path / "kat.safetensors"
        save_file(sd, str(src))
    else:
        src = tmp_path / "kat.pth"
        wrapper = "model" if fmt == "pth-model" else "state_dict"
        torch.save({wrapper: {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, src)
    out = tmp_path / "hf"
    convert_kat_checkpoint(src, out, num_attention_heads=HEADS)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
        assert (out / name).is_file(), name
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert isinstance(model, KATForImageClassification)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.image_size, cfg.patch_size,
            cfg.num_labels, cfg.rational_groups, cfg.rational_shared_numerator) == (
        D, LAYERS, HEADS, IMAGE, PATCH, CLASSES, GROUPS, shared)
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    expected = timm_forward(sd, pixels)
    with torch.no_grad():
        logits = model(pixels).logits
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        logits64 = model.double()(pixels.double()).logits
    torch.testing.assert_close(logits64, expected, rtol=1e-10, atol=1e-10)


def test_training_checkpoint_with_args_and_ema(tmp_path):
    """A timm training checkpoint: optimizer-free dict with an argparse.Namespace and EMA weights."""
    import argparse

    sd = synthetic_timm_state_dict()
    other = {k: v + 1.0 for k, v in sd.items()}
    src = tmp_path / "last.pth.tar"
    torch.save({"epoch": 299, "args": argparse.Namespace(lr=1e-3, model="kat_tiny"), "state_dict": other,
                "state_dict_ema": sd}, src)
    model = convert_kat_checkpoint(src, tmp_path / "ema", num_attention_heads=HEADS, use_ema=True)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits.double(), timm_forward(sd, pixels), rtol=1e-4, atol=1e-4)
    plain = convert_kat_checkpoint(src, tmp_path / "plain", num_attention_heads=HEADS)
    torch.testing.assert_close(plain.kat.embeddings.cls_token, other["cls_token"])


def test_cli_writes_model_processor_and_card(tmp_path):
    sd = synthetic_timm_state_dict()
    src = tmp_path / "kat_tiny_patch16_224_1f3ad3b2e698.pth"  # published-looking name, but not the published shapes
    torch.save(sd, src)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class_{i}" for i in range(CLASSES)))
    out = tmp_path / "out"
    assert cli_main(["convert-kat", str(src), str(out), "--num-heads", str(HEADS), "--labels", str(labels)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kat" and config["architectures"] == ["KATForImageClassification"]
    assert config["id2label"]["3"] == "class_3"
    # the converter records the PIL-only KAT processor (the published transform, whatever backends are installed)
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == "KATImageProcessor"
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(processor).__name__ == "KATImageProcessor" and processor.backend == "pil"
    assert processor.size["shortest_edge"] == IMAGE and processor.crop_pct == 0.875
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "pipeline_tag: image-classification" in card and "timm-converted" in card
    assert src.name in card and "license: mit" in card
    assert "reported by the authors" not in card  # shapes are not a published model: no borrowed metrics


def test_cli_reports_conversion_errors_without_traceback(tmp_path, capsys):
    src = tmp_path / "kat.pth"
    torch.save(synthetic_timm_state_dict(), src)
    assert cli_main(["convert-kat", str(src), str(tmp_path / "out"), "--preset", "kat-small"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-kan convert-kat: error: checkpoint does not match preset 'kat-small'")
    assert "Traceback" not in err


def test_headless_checkpoint_converts_to_bare_model(tmp_path):
    sd = synthetic_timm_state_dict(head=False)
    src = tmp_path / "kat.pth"
    torch.save(sd, src)
    model = convert_kat_checkpoint(src, tmp_path / "out", num_attention_heads=HEADS)
    assert isinstance(model, KATModel)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        pooled = model(pixels).pooler_output
    sd_with_head = dict(sd, **{"head.weight": torch.eye(CLASSES, D), "head.bias": torch.zeros(CLASSES)})
    torch.testing.assert_close(pooled[:, :CLASSES].double(), timm_forward(sd_with_head, pixels), rtol=1e-4, atol=1e-4)


def test_heads_come_from_published_width_or_must_be_given():
    sd = synthetic_timm_state_dict()
    with pytest.raises(ConversionError, match="num-heads"):
        infer_kat_config(sd)
    assert infer_kat_config(sd, num_attention_heads=4).num_attention_heads == 4


def test_preset_must_match_checkpoint():
    sd = synthetic_timm_state_dict()
    with pytest.raises(ConversionError, match="hidden_size: preset 192 vs checkpoint 32"):
        infer_kat_config(sd, preset="kat-tiny")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("blocks.1.mlp.act2.weight_denominator"), r"missing .*rational_2\.weight_denominator"),
        (lambda sd: sd.__setitem__("blocks.0.ls1.gamma", torch.ones(D)), r"unexpected keys .*blocks\.0\.ls1\.gamma"),
        (lambda sd: sd.__setitem__("blocks.1.attn.proj.weight", torch.ones(D, D + 1)),
         r"shape mismatches .*blocks\.1\.attn\.proj\.weight: checkpoint \(32, 33\) vs model \(32, 32\)"),
        (lambda sd: [sd.pop(k) for k in list(sd) if ".act" in k], "without GR-KAN rationals"),
        (lambda sd: sd.pop("cls_token"), "not a timm KAT/ViT layout"),
    ],
)
def test_wrong_layout_raises_clear_error(tmp_path, edit, message):
    sd = synthetic_timm_state_dict()
    edit(sd)
    src = tmp_path / "bad.pth"
    torch.save({"model": sd}, src)
    with pytest.raises(ConversionError, match=message):
        convert_kat_checkpoint(src, tmp_path / "out", num_attention_heads=HEADS)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_hf_layout_and_unreadable_inputs_are_rejected(tmp_path):
    model = KATForImageClassification(infer_kat_config(synthetic_timm_state_dict(), num_attention_heads=HEADS))
    src = tmp_path / "hf.pth"
    torch.save(model.state_dict(), src)
    with pytest.raises(ConversionError, match="already in the hf-kan"):
        convert_kat_checkpoint(src, tmp_path / "out")
    with pytest.raises(ConversionError, match="does not exist"):
        load_timm_state_dict(tmp_path / "missing.pth")
    pickled = tmp_path / "object.pth"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "args": object()}, pickled)
    with pytest.raises(ConversionError, match="weights_only"):
        load_timm_state_dict(pickled)


def test_published_checkpoints_are_recognised_by_hash_and_shape():
    from pathlib import Path

    from hf_kan import config_from_preset
    from hf_kan.models.kat.convert_kat_timm import REPORTED_TOP1, _published_size

    name = "kat_small_patch16_224_32487885cf13d2c14e461c9016fac8ad43f7c769171f132530941e930aeb5fe2.pth"
    assert _published_size(Path(name), config_from_preset("kat-small", num_labels=1000)) == "kat-small"
    assert _published_size(Path(name), config_from_preset("kat-small", num_labels=10)) is None  # fine-tuned head
    assert _published_size(Path("my_kat.pth"), config_from_preset("kat-small", num_labels=1000)) is None
    assert REPORTED_TOP1 == {"kat-tiny": 74.6, "kat-small": 81.2, "kat-base": 82.3}


def test_preset_and_published_width_give_heads_for_a_kat_tiny_layout():
    from hf_kan import config_from_preset
    from hf_kan.models.kat.convert_kat_timm import hf_key

    with torch.device("meta"):
        tiny = KATForImageClassification(config_from_preset("kat-tiny", num_labels=1000))
    # shapes only (meta tensors): the timm names of every KAT-T parameter
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
             "head.weight", "head.bias"]
    for i in range(12):
        names += [f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                  for p in ("weight", "bias")]
        names += [f"blocks.{i}.mlp.{a}.weight_{p}" for a in ("act1", "act2") for p in ("numerator", "denominator")]
    params = dict(tiny.named_parameters())
    sd = {n: params[hf_key(n)] for n in names}
    assert len(sd) == len(params)
    for kwargs in ({}, {"preset": "kat-tiny"}):
        config = infer_kat_config(sd, **kwargs)
        assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.image_size,
                config.num_labels, config.intermediate_size) == (192, 3, 12, 224, 1000, 768)
    with pytest.raises(ConversionError, match="num_hidden_layers: preset 12 vs checkpoint 11"):
        infer_kat_config({k: v for k, v in sd.items() if not k.startswith("blocks.11.")}, preset="kat-tiny")


def test_converted_directory_loads_with_pipeline(tmp_path):
    """A converted directory is complete: ``pipeline("image-classification")`` loads model and processor, and its
    scores are the model's softmax on the saved processor's output."""
    from PIL import Image
    from transformers import pipeline

    src = tmp_path / "kat.pth"
    torch.save(synthetic_timm_state_dict(), src)
    out = tmp_path / "out"
    convert_kat_checkpoint(src, out, num_attention_heads=HEADS)
    classify = pipeline("image-classification", model=str(out))
    image = Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy())
    scores = {entry["label"]: entry["score"] for entry in classify(image, top_k=CLASSES)}
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        probabilities = model(**AutoImageProcessor.from_pretrained(out)(image, return_tensors="pt")).logits.softmax(-1)
    assert len(scores) == CLASSES
    for index, probability in enumerate(probabilities[0].tolist()):
        assert scores[model.config.id2label[index]] == pytest.approx(probability, abs=1e-5)
