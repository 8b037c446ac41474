"""KAT model: registration, Auto round trip, presets, invariants (identity rationals == linear MLP / linear ViT)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import hf_kan
from hf_kan.errors import HFKanConfigError, ImageSizeError
from hf_kan.models.kat import KATConfig, KATForImageClassification, KATModel
from hf_kan.models.kat.image_processing_kat import kat_image_processor
from hf_kan.models.kat.modeling_kat import KATMLP, KATLayer
from hf_kan.modules.rational_presets import PRESETS


def tiny_config(**overrides) -> KATConfig:
    kwargs = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  rational_groups=4, num_labels=5)
    kwargs.update(overrides)
    return KATConfig(**kwargs)


def perturb_rationals(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move rational coefficients away from their preset, so a test notices if they are re-initialised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight_numerator" in name or "weight_denominator" in name:
                p.add_(torch.randn_like(p) * scale)


def test_registration_is_idempotent_and_exported():
    assert isinstance(AutoConfig.for_model("kat"), KATConfig)
    importlib.reload(importlib.import_module("hf_kan.models.kat"))  # importing twice is harmless
    importlib.reload(importlib.import_module("hf_kan.models.kat"))
    config = AutoConfig.for_model("kat", hidden_size=32, num_attention_heads=2, rational_groups=4)
    assert config.model_type == "kat"
    assert type(AutoModel.from_config(tiny_config())).__name__ == "KATModel"
    assert type(AutoModelForImageClassification.from_config(tiny_config())).__name__ == "KATForImageClassification"
    for name in ("KATConfig", "KATModel", "KATForImageClassification", "GroupRational"):
        assert name in hf_kan.__all__ and hasattr(hf_kan, name)
    assert {"kat-tiny", "kat-small", "kat-base"} <= set(hf_kan.available_presets())


@pytest.mark.parametrize("shared", [True, False])
def test_auto_round_trip_identical_logits(tmp_path, shared):
    model = KATForImageClassification(tiny_config(rational_shared_numerator=shared)).eval()
    perturb_rationals(model)
    x = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "README.md").is_file()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, KATForImageClassification)
    assert loaded.config.rational_shared_numerator is shared
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(base(x).pooler_output, model.kat(x).pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("preset", "expected"),
    # published: KAT-T 5,718,328; S 22.1M; B 86.6M (= timm ViT-S 22,050,664 / ViT-B 86,567,656 + 12 x 2 x 38)
    [("kat-tiny", 5_718_328), ("kat-small", 22_051_576), ("kat-base", 86_568_568)],
)
def test_preset_parameter_counts_match_published(preset, expected):
    config = hf_kan.config_from_preset(preset, num_labels=1000)
    assert (config.image_size, config.patch_size, config.rational_groups) == (224, 16, 8)
    with torch.device("meta"):
        model = KATForImageClassification(config)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_identity_rationals_make_the_mlp_linear():
    config = tiny_config(rational_1_init="identity", rational_2_init="identity")
    mlp = KATMLP(config)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(mlp(x), mlp.fc2(mlp.fc1(x)))
    layer = KATLayer(config).eval()
    h = torch.randn(2, 17, 32)
    attn, _ = layer.attention(layer.norm1(h))
    h1 = h + attn
    expected = h1 + layer.mlp.fc2(layer.mlp.fc1(layer.norm2(h1)))
    torch.testing.assert_close(layer(h), expected)


def test_identity_kat_equals_linear_vit():
    """KAT with identity rationals is Transformers' ViT with a linear MLP activation (independent implementation)."""
    config = tiny_config(rational_1_init="identity", rational_2_init="identity")
    kat = KATForImageClassification(config).eval()
    vit = ViTForImageClassification(
        ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, hidden_act="linear", layer_norm_eps=1e-6, qkv_bias=True, num_labels=5)
    ).eval()
    sd = kat.state_dict()
    mapped = {
        "vit.embeddings.cls_token": sd["kat.embeddings.cls_token"],
        "vit.embeddings.position_embeddings": sd["kat.embeddings.position_embeddings"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["kat.embeddings.patch_embeddings.projection.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["kat.embeddings.patch_embeddings.projection.bias"],
        "vit.layernorm.weight": sd["kat.layernorm.weight"],
        "vit.layernorm.bias": sd["kat.layernorm.bias"],
        "classifier.weight": sd["classifier.weight"],
        "classifier.bias": sd["classifier.bias"],
    }
    vit_keys = set(vit.state_dict())
    for i in range(2):
        k, v = f"kat.layers.{i}.", f"vit.layers.{i}."
        renames = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                   ("attention.proj", "attention.o_proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
        for src, dst in renames:
            for p in ("weight", "bias"):
                mapped[f"{v}{dst}.{p}"] = sd[f"{k}{src}.{p}"]
        for p in ("weight", "bias"):
            q, kk, vv = sd[f"{k}attention.qkv.{p}"].chunk(3, dim=0)
            mapped[f"{v}attention.q_proj.{p}"], mapped[f"{v}attention.k_proj.{p}"] = q, kk
            mapped[f"{v}attention.v_proj.{p}"] = vv
    assert set(mapped) == vit_keys, sorted(vit_keys ^ set(mapped))
    vit.load_state_dict(mapped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(kat(x).logits, vit(x).logits, rtol=1e-5, atol=1e-5)


def test_sdpa_and_eager_agree_and_switching_works():
    model = KATForImageClassification(tiny_config()).eval()
    perturb_rationals(model)
    assert model.config._attn_implementation == "sdpa"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sdpa = model(x).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        out = model(x, output_attentions=True)
    torch.testing.assert_close(out.logits, sdpa, rtol=1e-5, atol=1e-5)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 2, 17))


def test_loss_and_hidden_states():
    model = KATForImageClassification(tiny_config()).eval()
    x = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 4, 2])
    out = model(x, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert len(out.hidden_states) == 3
    with torch.no_grad():
        emb = model.kat.embeddings(x)
        torch.testing.assert_close(out.hidden_states[0], emb)
        h = emb
        for i, layer in enumerate(model.kat.layers):
            h = layer(h)
            torch.testing.assert_close(out.hidden_states[i + 1], h)
        torch.testing.assert_close(out.logits, model.classifier(model.kat.layernorm(h)[:, 0]))
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.kat.layers[0].mlp.rational_2.weight_denominator.grad.abs().sum() > 0


def test_position_embedding_interpolation():
    model = KATForImageClassification(tiny_config()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, interpolate_pos_encoding=True).logits, model(x).logits)
        with pytest.raises(ImageSizeError, match="interpolate_pos_encoding"):
            model(torch.randn(1, 3, 48, 40))
        out = model(torch.randn(1, 3, 48, 40), interpolate_pos_encoding=True)
        assert out.logits.shape == (1, 5)
        emb = model.kat.embeddings
        pos = emb.interpolate_pos_encoding(48, 40)
        grid = emb.position_embeddings[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        manual = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False)
        torch.testing.assert_close(pos[:, 1:], manual.permute(0, 2, 3, 1).reshape(1, 30, 32))
        torch.testing.assert_close(pos[:, :1], emb.position_embeddings[:, :1])
        with pytest.raises(ImageSizeError, match="multiple of the patch size"):
            model(torch.randn(1, 3, 36, 36), interpolate_pos_encoding=True)


def test_init_schemes():
    common = dict(hidden_size=64, rational_groups=8, rational_backend="reference")
    vp = KATForImageClassification(tiny_config(init_scheme="variance_preserving", **common))
    tn = KATForImageClassification(tiny_config(init_scheme="trunc_normal", **common))
    gain_sq = PRESETS["swish"].gain_sq
    fc1 = torch.cat([layer.mlp.fc1.weight.flatten() for layer in vp.kat.layers])
    fc2 = torch.cat([layer.mlp.fc2.weight.flatten() for layer in vp.kat.layers])
    assert fc1.std().item() == pytest.approx((1 / 64) ** 0.5, rel=0.05)  # identity rational in front: gain 1
    assert fc2.std().item() == pytest.approx((gain_sq / 256) ** 0.5, rel=0.05)  # swish rational in front
    fc2_tn = torch.cat([layer.mlp.fc2.weight.flatten() for layer in tn.kat.layers])
    assert fc2_tn.std().item() == pytest.approx(0.02, rel=0.1)
    for model in (vp, tn):
        torch.testing.assert_close(model.kat.layers[1].mlp.rational_2.weight_numerator,
                                   torch.tensor([PRESETS["swish"].numerator]))
    # the variance-preserving init keeps the MLP output scale close to its input scale
    x = torch.randn(4096, 64)
    mlp = vp.kat.layers[0].mlp
    with torch.no_grad():
        h = mlp.fc1(mlp.rational_1(x))
        assert h.var().item() == pytest.approx(1.0, rel=0.15)
        assert mlp.fc2(mlp.rational_2(h)).var().item() == pytest.approx(1.0, rel=0.2)


def test_config_validation_and_backend_plumbing():
    with pytest.raises(HFKanConfigError, match="num_attention_heads"):
        tiny_config(num_attention_heads=3)
    with pytest.raises(HFKanConfigError, match="rational_groups"):
        tiny_config(rational_groups=5)
    with pytest.raises(HFKanConfigError, match="rational preset"):
        tiny_config(rational_2_init="mish")
    with pytest.raises(HFKanConfigError, match="rational_backend"):
        tiny_config(rational_backend="cuda-magic")
    with pytest.raises(HFKanConfigError, match="patch_size"):
        tiny_config(image_size=30)
    config = tiny_config(rational_backend="reference", mlp_ratio=2)
    assert config.intermediate_size == 64
    model = KATModel(config)
    assert {m.backend for m in model.modules() if isinstance(m, hf_kan.GroupRational)} == {"reference"}
    assert model.layers[0].mlp.fc1.out_features == 64


def test_drop_path_and_gradient_checkpointing():
    model = KATForImageClassification(tiny_config(drop_path_rate=0.5)).train()
    assert model.kat.layers[0].drop_path.drop_prob == 0.0 and model.kat.layers[1].drop_path.drop_prob == 0.5
    x = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([1, 3])
    model.eval()
    ref = model(x, labels=labels)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    out = model(x, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6)


def timm_eval_transform(image: Image.Image, image_size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """timm's eval transform written out: Resize(floor(size / crop_pct), bicubic) of the shorter side (PIL, longer
    side truncated as torchvision computes it), CenterCrop(size) with torchvision's round((side - crop) / 2)
    offsets, ToTensor, Normalize(ImageNet mean/std)."""
    scale = math.floor(image_size / crop_pct)
    width, height = image.size
    if width <= height:
        new_w, new_h = scale, int(scale * height / width)
    else:
        new_w, new_h = int(scale * width / height), scale
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    crop = resized.crop((left, top, left + image_size, top + image_size))
    x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("backend", [None, "torchvision", "pil"])
def test_auto_image_processor_reproduces_the_timm_transform(tmp_path, monkeypatch, backend):
    from transformers.models.auto import image_processing_auto

    from hf_kan.models.kat import KATImageProcessor

    kat_image_processor(224).save_pretrained(tmp_path)
    # what AutoImageProcessor does on a machine with torchvision installed: it resolves backend=None to
    # "torchvision" (torchvision itself is not installed here: the PyPI build needs the CUDA torch)
    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    assert image_processing_auto._resolve_backend(None, None, "KATImageProcessor") == "torchvision"
    # KAT's processor is registered for the PIL backend only, so there is no torchvision class to pick
    assert image_processing_auto._find_mapping_for_image_processor("KATImageProcessor") == {"pil": KATImageProcessor}
    kwargs = {} if backend is None else {"backend": backend}
    loaded = AutoImageProcessor.from_pretrained(tmp_path, **kwargs)
    assert type(loaded) is KATImageProcessor and loaded.backend == "pil" and loaded.crop_pct == 0.875

    rng = np.random.default_rng(0)
    # sizes whose resized longer side minus 224 is 0, 3 and 1 (mod 4): where floor and round-half-even crop offsets
    # differ (343 - 224 = 119), and portrait / landscape / square inputs
    for height, width in [(300, 400), (256, 343), (343, 256), (257, 258), (224, 224), (500, 333)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        out = loaded(image, return_tensors="pt").pixel_values
        assert out.shape == (1, 3, 224, 224)
        torch.testing.assert_close(out[0], timm_eval_transform(image, 224), rtol=0, atol=1e-6)


def test_kat_image_processor_rejects_bad_arguments_and_crops_at_any_size():
    with pytest.raises(HFKanConfigError):
        kat_image_processor(0)
    with pytest.raises(HFKanConfigError):
        kat_image_processor(224, crop_pct=1.5)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 500, 3), dtype=np.uint8))
    out = kat_image_processor(448)(image, return_tensors="pt").pixel_values  # timm keeps the crop rule at 448
    torch.testing.assert_close(out[0], timm_eval_transform(image, 448), rtol=0, atol=1e-6)


def test_backbone_feature_maps(tmp_path):
    from transformers import AutoBackbone

    from hf_kan.models.kat import KATBackbone

    config = tiny_config(num_hidden_layers=3)
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3"] and config.out_features == ["stage3"]
    assert isinstance(AutoBackbone.from_config(config), KATBackbone)
    model = KATForImageClassification(config).eval()
    perturb_rationals(model)
    model.save_pretrained(tmp_path)
    # (AutoBackbone.from_pretrained asks the Hub whether the id exists, so local directories load via the class)
    backbone = KATBackbone.from_pretrained(tmp_path, out_features=["stem", "stage2"]).eval()
    assert backbone.channels == [32, 32]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = backbone(x).feature_maps
        states = model.kat(x, output_hidden_states=True).hidden_states
    for fmap, state in zip(maps, (states[0], states[2])):
        expected = model.kat.layernorm(state)[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
        torch.testing.assert_close(fmap, expected)
    with torch.no_grad():
        assert [m.shape for m in backbone(torch.randn(1, 3, 48, 24)).feature_maps] == [(1, 32, 6, 3)] * 2


def test_backbone_returns_exactly_the_stages_and_outputs_asked_for():
    from hf_kan.models.kat import KATBackbone

    config = tiny_config(num_hidden_layers=3, out_features=["stem", "stage2"], attn_implementation="eager")
    backbone = KATBackbone(config).eval()
    encoder = KATModel(config).eval()
    encoder.load_state_dict(backbone.state_dict())  # same parameter names
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = backbone(x)
        full = backbone(x, output_hidden_states=True, output_attentions=True)
        picked = backbone(x, output_hidden_states=[0, -1])
        reference = encoder(x, output_hidden_states=True, output_attentions=True)
    # by default: the requested feature maps only, no hidden states, no attentions
    assert len(plain.feature_maps) == 2 and plain.hidden_states is None and plain.attentions is None
    for fmap, state in zip(plain.feature_maps, (reference.hidden_states[0], reference.hidden_states[2])):
        torch.testing.assert_close(fmap, encoder.layernorm(state)[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
    # asked for: every hidden state (embeddings + 3 blocks) and the [B, H, T, T] attentions of the 3 blocks
    assert len(full.hidden_states) == 4 and len(full.attentions) == 3
    for got, want in zip(full.hidden_states + full.attentions, reference.hidden_states + reference.attentions):
        torch.testing.assert_close(got, want)
    assert full.attentions[0].shape == (2, 2, 17, 17)
    # an index selection returns those hidden states only, as in every Transformers model
    assert [h is not None for h in picked.hidden_states] == [True, False, False, True]
    assert picked.attentions is None
    assert len(backbone(x, return_dict=False)) == 1  # (feature_maps,)


@pytest.mark.parametrize("auto_name", ["AutoModel", "AutoModelForImageClassification", "AutoBackbone"])
def test_from_config_in_bf16_keeps_rationals_fp32_and_forward_finite(auto_name):
    import transformers

    auto = getattr(transformers, auto_name)
    model = auto.from_config(tiny_config(), dtype=torch.bfloat16).eval()
    rational = {n: p.dtype for n, p in model.named_parameters() if ".rational_" in n}
    others = {p.dtype for n, p in model.named_parameters() if ".rational_" not in n}
    assert rational and set(rational.values()) == {torch.float32} and others == {torch.bfloat16}
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    result = out.feature_maps[-1] if auto_name == "AutoBackbone" else out[0]
    assert result.dtype == torch.bfloat16 and torch.isfinite(result.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading_keeps_rationals_fp32(tmp_path, dtype):
    model = KATForImageClassification(tiny_config()).eval()
    perturb_rationals(model)
    model.save_pretrained(tmp_path)
    half = KATForImageClassification.from_pretrained(tmp_path, dtype=dtype).eval()
    mlp = half.kat.layers[0].mlp
    assert mlp.fc1.weight.dtype == dtype
    assert mlp.rational_1.weight_numerator.dtype == mlp.rational_2.weight_denominator.dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = half(x.to(dtype)).logits
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), model(x).logits.detach(), rtol=0, atol=0.05)


def test_public_api_of_the_kat_package():
    import hf_kan.models.kat as kat_pkg
    from hf_kan.models.kat import configuration_kat, convert_kat_timm, modeling_kat

    assert sorted(kat_pkg.__all__) == sorted([
        "KAT_SIZES", "KATBackbone", "KATConfig", "KATForImageClassification", "KATImageProcessor", "KATModel",
        "KATPreTrainedModel", "kat_image_processor",
    ])
    for module in (kat_pkg, configuration_kat, modeling_kat, convert_kat_timm):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
