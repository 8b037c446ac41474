"""KArAt models: Auto registration, presets, save/load, operator sharing, image-size checks, outputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForImageClassification

import hf_kan
from hf_kan.errors import HFKanConfigError, ImageSizeError
from hf_kan.models import karat
from hf_kan.models.karat import KArAtConfig, KArAtForImageClassification, KArAtModel


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny ops: one intra-op thread is far faster than two on a shared, loaded 2-core machine (no barrier waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> KArAtConfig:
    kwargs = dict(
        hidden_size=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=40,
        image_size=12,
        patch_size=4,  # 9 patches + class token: N = 10
        karat_grid_size=2,
        karat_rank=5,
        num_labels=4,
    )
    kwargs.update(overrides)
    return KArAtConfig(**kwargs)


def pixels(batch: int = 2, size: int = 12) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def test_public_api():
    assert set(karat.__all__) == {
        "KARAT_SIZES", "KARAT_VARIANTS", "KArAtConfig", "KArAtForImageClassification", "KArAtModel",
        "KArAtPreTrainedModel", "karat_attention_forward",
    }
    for name in ("KArAtConfig", "KArAtForImageClassification", "KArAtModel", "FourierKArAtOperator"):
        assert name in hf_kan.__all__ and getattr(hf_kan, name) is not None


def test_auto_registration():
    kwargs = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("karat", **kwargs)
    assert type(config) is KArAtConfig and config.karat_grid_size == 2
    assert type(AutoModel.from_config(config)) is KArAtModel
    assert type(AutoModelForImageClassification.from_config(config)) is KArAtForImageClassification


def test_presets_cover_sizes_and_variants():
    expected = {
        "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
    }
    variants = {"g3b": (3, "blockwise"), "g3u": (3, "universal"), "g1b": (1, "blockwise")}
    for size, (hidden, layers, heads) in expected.items():
        for suffix, (grid, sharing) in variants.items():
            config = hf_kan.config_from_preset(f"karat-{size}-{suffix}", num_labels=10)
            assert isinstance(config, KArAtConfig)
            assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
            assert (config.karat_grid_size, config.karat_sharing, config.karat_rank) == (grid, sharing, 12)
            assert (config.image_size, config.patch_size, config.num_tokens, config.num_labels) == (224, 16, 197, 10)
    # KArAt-T G3B: 12 operators x 3 heads x 197 tokens x rank 12 x (2*3 + 1) coefficients
    assert hf_kan.config_from_preset("karat-tiny-g3b").num_operator_parameters == 12 * 3 * 197 * 12 * 7
    assert hf_kan.config_from_preset("karat-tiny-g3u").num_operator_parameters == 3 * 197 * 12 * 7


@pytest.mark.parametrize("sharing", ["blockwise", "universal"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, sharing):
    model = KArAtForImageClassification(tiny_config(karat_sharing=sharing)).eval()
    x = pixels()
    with torch.no_grad():
        logits = model(x).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is KArAtForImageClassification
    assert reloaded.config.karat_sharing == sharing and reloaded.config.karat_grid_size == 2
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    card = (tmp_path / "README.md").read_text()  # rendered from model_cards/karat.md
    assert "Fourier-KArAt" in card and "KArAtForImageClassification" in card
    assert f"| `karat_sharing` | `'{sharing}'` |" in card


@pytest.mark.parametrize("sharing", ["blockwise", "universal"])
def test_parameter_count_matches_formula(sharing):
    config = tiny_config(karat_sharing=sharing)
    model = KArAtModel(config)
    heads, n, grid, rank, layers = 2, 10, 2, 5, 3
    per_operator = heads * n * rank * (2 * grid + 1)
    operators = layers if sharing == "blockwise" else 1
    assert config.num_operator_parameters == operators * per_operator
    assert len(model.attention_operators) == operators
    assert sum(p.numel() for p in model.attention_operators.parameters()) == operators * per_operator
    # everything else is a plain pre-norm ViT of the same shape
    d, i, p, c = 24, 40, 4, 3
    vit_params = (
        d * c * p * p + d  # patch projection
        + d + n * d  # class token, position embedding
        + layers * (4 * d + 3 * d * d + 3 * d + d * d + d + d * i + i + i * d + d)  # 2 LayerNorms, qkv, proj, MLP
        + 2 * d  # final LayerNorm
    )
    assert sum(p.numel() for p in model.parameters()) == vit_params + operators * per_operator


def test_universal_operator_is_really_shared():
    universal = KArAtForImageClassification(tiny_config(karat_sharing="universal"))
    shared = universal.karat.attention_operators[0]
    assert all(universal.karat.operator_for_layer(i) is shared for i in range(3))
    # A blockwise model with every operator set to the universal one computes the same function, and the shared
    # operator's gradient is the sum of the per-layer gradients of those copies.
    blockwise = KArAtForImageClassification(tiny_config(karat_sharing="blockwise"))
    state = {k: v for k, v in universal.state_dict().items() if "attention_operators" not in k}
    for layer in range(3):
        for name, value in shared.state_dict().items():
            state[f"karat.attention_operators.{layer}.{name}"] = value
    blockwise.load_state_dict(state, strict=True)
    x, labels = pixels(), torch.tensor([0, 3])
    loss_u = universal(x, labels=labels).loss
    loss_b = blockwise(x, labels=labels).loss
    torch.testing.assert_close(loss_u, loss_b, rtol=1e-6, atol=1e-6)
    loss_u.backward()
    loss_b.backward()
    for name in ("fourier_coeffs", "low_rank_weight"):
        per_layer = [getattr(blockwise.karat.attention_operators[i], name).grad for i in range(3)]
        assert all(g is not None and g.abs().sum() > 0 for g in per_layer)
        torch.testing.assert_close(getattr(shared, name).grad, sum(per_layer), rtol=1e-5, atol=1e-7)


def test_gradients_flow_to_every_operator_coefficient():
    model = KArAtForImageClassification(tiny_config())
    model(pixels(4), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
    for op in model.karat.attention_operators:
        assert bool((op.fourier_coeffs.grad != 0).all()) and bool((op.low_rank_weight.grad != 0).all())


def test_other_image_size_raises_image_size_error_naming_configured_size():
    model = KArAtForImageClassification(tiny_config())
    with pytest.raises(ImageSizeError, match="12x12"):
        model(pixels(size=16))
    with pytest.raises(ImageSizeError, match="interpolate_pos_encoding"):
        model(pixels(), interpolate_pos_encoding=True)
    with pytest.raises(ImageSizeError, match="channels|shape"):
        model(torch.randn(2, 1, 12, 12))


@pytest.mark.parametrize("sharing", ["blockwise", "universal"])
def test_builds_on_the_meta_device_then_loads_a_state_dict(tmp_path, sharing):
    config = tiny_config(karat_sharing=sharing, drop_path_rate=0.1)
    reference = KArAtForImageClassification(config).eval()
    with torch.device("meta"):
        model = KArAtForImageClassification(config)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert [layer.drop_path.drop_prob for layer in model.karat.layers] == pytest.approx([0.0, 0.05, 0.1])
    model.load_state_dict(reference.state_dict(), assign=True)
    model.eval()
    x = pixels()
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=0)
    # the same path from_pretrained takes with a device_map (meta init, then weights materialised by accelerate)
    reference.save_pretrained(tmp_path)
    loaded = KArAtForImageClassification.from_pretrained(tmp_path, device_map="cpu").eval()
    torch.testing.assert_close(loaded(x).logits, reference(x).logits, rtol=0, atol=0)


def test_invalid_config_values_raise():
    with pytest.raises(HFKanConfigError, match="karat_sharing"):
        tiny_config(karat_sharing="per_head")
    with pytest.raises(HFKanConfigError, match="karat_implementation"):
        tiny_config(karat_implementation="triton")
    with pytest.raises(HFKanConfigError, match="patch_size"):
        tiny_config(image_size=13)
    with pytest.raises(HFKanConfigError, match="karat_rank"):
        tiny_config(karat_rank=0)


def test_attentions_and_hidden_states_outputs():
    model = KArAtForImageClassification(tiny_config()).eval()
    x = pixels()
    with torch.no_grad():
        plain = model(x)
        out = model(x, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-6)
    assert plain.attentions is None
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3  # embeddings + every block
    assert out.attentions[0].shape == (2, 2, 10, 10)
    # the returned matrix is the operator's sigma_hat(A): recompute layer 0's from its input
    layer = model.karat.layers[0]
    with torch.no_grad():
        h = layer.norm1(model.karat.embeddings(x))
        q, k, _ = layer.attention.qkv(h).reshape(2, 10, 3, 2, 12).permute(2, 0, 3, 1, 4).unbind(0)
        expected = model.karat.attention_operators[0].attention_weights(q @ k.transpose(-1, -2) / 12**0.5)
    torch.testing.assert_close(out.attentions[0], expected, rtol=1e-5, atol=1e-6)


def test_reference_implementation_gives_the_same_model_output():
    fast = KArAtForImageClassification(tiny_config()).eval()
    ref = KArAtForImageClassification(tiny_config(karat_implementation="reference")).eval()
    ref.load_state_dict(fast.state_dict())
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, fast(x).logits, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = KArAtForImageClassification(tiny_config(karat_sharing="universal"))
    x, labels = pixels(), torch.tensor([1, 2])
    model(x, labels=labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()
    model.train()
    model(x, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_attention_implementation_defaults_to_karat_and_routes_through_the_interface():
    config = tiny_config()
    model = KArAtForImageClassification(config).eval()
    assert model.config._attn_implementation == "eager"
    assert KArAtForImageClassification._can_set_attn_implementation()
    with pytest.raises(ValueError):  # softmax SDPA is not KArAt: not declared as supported
        AutoModelForImageClassification.from_config(tiny_config(), attn_implementation="sdpa")

    seen = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs["karat_operator"])
        return karat.karat_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("karat_test_recording", recording_attention)
    x = pixels()
    with torch.no_grad():
        expected = model(x).logits
        model.set_attn_implementation("karat_test_recording")
        got = model(x).logits
    assert model.config._attn_implementation == "karat_test_recording"
    assert seen == [model.karat.attention_operators[i] for i in range(3)]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
