"""PyTorch KAT (Kolmogorov-Arnold Transformer, Yang & Wang, arXiv 2409.10594).

A ViT (class token, learned position embedding, pre-norm blocks) whose MLP is two Group-Rational KAN
layers: ``rational_1 -> fc1 -> rational_2 -> fc2``. Attention goes through Transformers'
attention interface (``"sdpa"`` by default, ``"eager"`` or any registered implementation).
"""

# (no `from __future__ import annotations`: Transformers inspects the `**kwargs: Unpack[TransformersKwargs]`
# annotation of the forwards at run time, e.g. to tell whether a model can return attentions)

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ...errors import ImageSizeError
from ...hub import ModelCardMixin
from ...modules.group_rational import GroupRational
from ...modules.vit_embeddings import ClassTokenEmbeddings, PatchEmbeddings
from ..vit_common import (
    ClassTokenClassifierMixin,
    PreNormBlock,
    build_classifier,
    drop_path_rates,
    init_vit_weights,
)
from .configuration_kat import KATConfig

logger = logging.get_logger(__name__)


class KATPatchEmbeddings(PatchEmbeddings):
    """Patch projection ``[B, C, H, W] -> [B, (H/p)*(W/p), D]`` for any ``H, W`` that are multiples of the patch."""

    def __init__(self, config: KATConfig):
        super().__init__(config.num_channels, config.hidden_size, config.patch_size, model_name="KAT")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_layout(pixel_values)
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ImageSizeError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "resize or crop the images (the image processor does this)"
            )
        return self.project(pixel_values)


class KATEmbeddings(ClassTokenEmbeddings):
    """Class token + patch embeddings + learned position embedding (bicubically resized for other image sizes)."""

    def __init__(self, config: KATConfig):
        super().__init__(config, KATPatchEmbeddings(config), num_positions=config.num_patches + 1)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a ``height x width`` image: the patch grid is resized bicubically."""
        grid = self.config.image_size // self.config.patch_size
        new_h, new_w = height // self.config.patch_size, width // self.config.patch_size
        if (new_h, new_w) == (grid, grid) and not torch.jit.is_tracing():
            return self.position_embeddings
        cls_pos = self.position_embeddings[:, :1]
        patch_pos = self.position_embeddings[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = nn.functional.interpolate(
            patch_pos.float(), size=(new_h, new_w), mode="bicubic", align_corners=False
        ).to(cls_pos.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        _, _, height, width = pixel_values.shape
        patch_tokens = self.patch_embeddings(pixel_values)
        if interpolate_pos_encoding:
            position_embeddings = self.interpolate_pos_encoding(height, width)
        else:
            size = self.config.image_size
            if height != size or width != size:
                raise ImageSizeError(
                    f"input image size {height}x{width} does not match the model's {size}x{size}; pass "
                    "interpolate_pos_encoding=True to resize the position embedding, or resize the images"
                )
            position_embeddings = self.position_embeddings
        return self.add_class_token_and_position(patch_tokens, position_embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling + mask) v, returned as ``[B, T, H, d]`` with the ``[B, H, T, S]`` weights."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class KATAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout: q, k, v stacked along the output)."""

    def __init__(self, config: KATConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d]

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1).contiguous()
        return self.proj(attn_output), attn_weights


class KATLinear(nn.Linear):
    """``nn.Linear`` that records the variance-preserving gain of the activation in front of it (used by init)."""

    def __init__(self, in_features: int, out_features: int, init_gain: float = 1.0):
        super().__init__(in_features, out_features)
        self.init_gain = init_gain


class KATMLP(nn.Module):
    """GR-KAN MLP: ``fc2(rational_2(fc1(rational_1(x))))`` (each KAN layer is "activation, then linear")."""

    def __init__(self, config: KATConfig):
        super().__init__()
        rational = dict(
            num_groups=config.rational_groups,
            shared_numerator=config.rational_shared_numerator,
            backend=config.rational_backend,
        )
        self.rational_1 = GroupRational(config.hidden_size, init=config.rational_1_init, **rational)
        self.fc1 = KATLinear(config.hidden_size, config.intermediate_size, init_gain=self.rational_1.gain)
        self.rational_2 = GroupRational(config.intermediate_size, init=config.rational_2_init, **rational)
        self.fc2 = KATLinear(config.intermediate_size, config.hidden_size, init_gain=self.rational_2.gain)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # dropout sits between each activation and its linear layer, as in the authors' KAN module
        hidden_states = self.fc1(self.dropout(self.rational_1(hidden_states)))
        return self.fc2(self.dropout(self.rational_2(hidden_states)))


class KATLayer(PreNormBlock):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (GR-KAN MLP).

    Called as ``layer(hidden_states, attention_mask=None, **kwargs)``.
    """

    def __init__(self, config: KATConfig, drop_path: float = 0.0):
        super().__init__(config, KATAttention, KATMLP, drop_path=drop_path)


class KATPreTrainedModel(ModelCardMixin, PreTrainedModel):
    """Base class of the KAT models: weight initialisation, the Transformers integration flags, and a model card
    (README.md) written by ``save_pretrained`` / ``push_to_hub`` (see :mod:`hf_kan.hub`)."""

    config: KATConfig
    config_class = KATConfig
    base_model_prefix = "kat"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["KATEmbeddings", "KATLayer"]
    # rational coefficients span ~4 orders of magnitude (a_5 ~ 1e-4 next to a_1 ~ 1): keep them fp32 when a
    # checkpoint is loaded in fp16/bf16 (the rational backends compute in fp32 whatever the input dtype)
    _keep_in_fp32_modules_strict = ["rational_1", "rational_2"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": KATLayer, "attentions": KATAttention}

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise ``module`` according to ``config.init_scheme`` (see :class:`KATConfig`)."""
        std = self.config.initializer_range
        if isinstance(module, KATLinear) and self.config.init_scheme == "variance_preserving":
            # kaiming-normal (fan-in) scaled by the variance-preserving gain of the rational in front of the layer
            init.normal_(module.weight, mean=0.0, std=module.init_gain / math.sqrt(module.in_features))
            init.zeros_(module.bias)
        elif isinstance(module, GroupRational):
            numerator, denominator = module.preset_coefficients()
            init.copy_(module.weight_numerator, numerator)
            init.copy_(module.weight_denominator, denominator)
        else:
            init_vit_weights(module, std)


class KATModel(KATPreTrainedModel):
    """The bare KAT encoder: returns the normalised token states and the normalised class token as pooler output."""

    def __init__(self, config: KATConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = KATEmbeddings(config)
        self.layers = nn.ModuleList([KATLayer(config, drop_path=rate) for rate in drop_path_rates(config)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> KATPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""Encode ``pixel_values`` ``[B, C, H, W]``.

        ``interpolate_pos_encoding``: resize the position embedding bicubically for images whose size differs from
        ``config.image_size``. ``output_hidden_states=True`` returns the embeddings and the output of every block.
        """
        if pixel_values is None:
            raise ValueError("KATModel needs pixel_values")
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        for layer in self.layers:
            hidden_states = layer(hidden_states, None, **kwargs)
        sequence_output = self.layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0])


class KATForImageClassification(ClassTokenClassifierMixin, KATPreTrainedModel):
    """KAT with a linear classifier on the (normalised) class token (``forward``: see
    :class:`~hf_kan.models.vit_common.ClassTokenClassifierMixin`)."""

    def __init__(self, config: KATConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.kat = KATModel(config)
        self.classifier = build_classifier(config)
        self.post_init()


class KATBackbone(BackboneMixin, KATPreTrainedModel):
    """KAT as a feature extractor for ``AutoBackbone`` (detection / segmentation heads).

    Returns, for each stage in ``config.out_features``, the layer-normalised patch tokens reshaped to a feature map
    ``[B, D, H / patch, W / patch]`` (class token dropped). Any image size that is a multiple of the patch size is
    accepted (the position embedding is resized bicubically).
    """

    def __init__(self, config: KATConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = KATEmbeddings(config)
        self.layers = nn.ModuleList([KATLayer(config, drop_path=rate) for rate in drop_path_rates(config)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> KATPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        r"""Feature maps of the stages in ``config.out_features`` for ``pixel_values`` ``[B, C, H, W]``.

        ``output_hidden_states=True`` also returns the embeddings and the output of every block (an index or a list
        of indices returns only those, as in every Transformers model); ``output_attentions=True`` the ``[B, H, T, T]``
        attention weights of every block (needs an implementation that forms them, e.g. ``"eager"``).
        """
        batch_size, _, height, width = pixel_values.shape
        grid_h, grid_w = height // self.config.patch_size, width // self.config.patch_size

        def feature_map(stage_idx: int, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if self.stage_names[stage_idx] not in self.out_features:
                return ()
            tokens = self.layernorm(state)[:, 1:]  # drop the class token
            return (tokens.reshape(batch_size, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous(),)

        hidden_states = self.embeddings(pixel_values.to(self.layernorm.weight.dtype), interpolate_pos_encoding=True)
        feature_maps = feature_map(0, hidden_states)
        for stage_idx, layer in enumerate(self.layers, start=1):
            hidden_states = layer(hidden_states, None, **kwargs)
            feature_maps += feature_map(stage_idx, hidden_states)
        # hidden_states / attentions are filled in by capture_outputs when (and as far as) they are asked for
        return BackboneOutput(feature_maps=feature_maps)


__all__ = ["KATBackbone", "KATForImageClassification", "KATModel", "KATPreTrainedModel"]
