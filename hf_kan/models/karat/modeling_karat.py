"""PyTorch KArAt (Kolmogorov-Arnold Attention, Maity et al., arXiv 2503.10632), Fourier-KArAt variant.

A ViT (class token, learned position embedding, pre-norm blocks, GELU MLP) whose attention replaces the row-wise
softmax of ``Q K^T / sqrt(d)`` by the learnable Fourier-KArAt operator
(:class:`hf_kan.modules.fourier_attention.FourierKArAtOperator`). The operators live in
``KArAtModel.attention_operators``: one per layer (``karat_sharing="blockwise"``) or a single one used by every
layer (``"universal"``). Their parameters are indexed by token position, so the model only runs at the configured
image size.

Attention implementation: the default (``"eager"``) is the KArAt operator, :func:`karat_attention_forward`. The
model declares no SDPA/flash/flex support because those compute softmax attention, a different function. A custom
function registered with ``AttentionInterface`` may be selected; it receives the layer's operator as the keyword
``karat_operator`` and replaces the KArAt computation (a warning says so).
"""

# (no `from __future__ import annotations`: Transformers inspects the `**kwargs: Unpack[TransformersKwargs]`
# annotation of the forwards at run time, e.g. to tell whether a model can return attentions)

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ...errors import ImageSizeError, UnsupportedModelError
from ...hub import ModelCardMixin
from ...modules.fourier_attention import FourierKArAtOperator
from ...modules.vit_embeddings import ClassTokenEmbeddings, PatchEmbeddings
from ..vit_common import (
    ClassTokenClassifierMixin,
    PreNormBlock,
    build_classifier,
    drop_path_rates,
    init_vit_weights,
)
from .configuration_karat import KArAtConfig

logger = logging.get_logger(__name__)


def _size_error(config: KArAtConfig, got: str) -> ImageSizeError:
    size, patch = config.image_size, config.patch_size
    return ImageSizeError(
        f"this KArAt model was built for {size}x{size} images (patch {patch}, N={config.num_tokens} tokens) but got "
        f"{got}. Its learnable attention operator has parameters per token position, so it only runs at the "
        f"configured size: resize or crop the images to {size}x{size} (the image processor does this), or build a "
        "new model with the image_size you need (position-embedding interpolation cannot apply to the operator)."
    )


class KArAtPatchEmbeddings(PatchEmbeddings):
    """Split ``pixel_values`` ``[B, C, H, W]`` into patches and project them: ``[B, (H/p)*(W/p), D]``."""

    def __init__(self, config: KArAtConfig):
        super().__init__(config.num_channels, config.hidden_size, config.patch_size, model_name="KArAt")


class KArAtEmbeddings(ClassTokenEmbeddings):
    """Class token + patch embeddings + learned position embedding, for ``config.image_size`` images only."""

    def __init__(self, config: KArAtConfig):
        super().__init__(config, KArAtPatchEmbeddings(config), num_positions=config.num_tokens)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if height != self.config.image_size or width != self.config.image_size:
            raise _size_error(self.config, f"{height}x{width} images")
        return self.add_class_token_and_position(self.patch_embeddings(pixel_values), self.position_embeddings)


def karat_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    karat_operator: FourierKArAtOperator | None = None,
    output_attentions: bool = False,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KArAt attention: ``sigma_hat(q k^T * scaling) v`` with the learnable operator, returned as ``[B, T, H, d]``.

    ``sigma_hat`` replaces softmax row by row (see ``FourierKArAtOperator``). The ``[B, H, T, T]`` weights are
    returned (and formed) only when ``output_attentions`` is set. Masks are not supported: the operator has no
    notion of a masked key.
    """
    if karat_operator is None:
        raise UnsupportedModelError(
            "karat_attention_forward needs the layer's Fourier-KArAt operator: pass karat_operator=..."
        )
    if attention_mask is not None:
        raise UnsupportedModelError(
            "KArAt attention does not support attention masks: the learnable operator mixes all N scores of a row, "
            "so there is no way to exclude a key. Run without attention_mask."
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    attn_output, attn_weights = karat_operator(scores, value, dropout=dropout, return_weights=bool(output_attentions))
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class KArAtAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection whose softmax is the given KArAt operator."""

    def __init__(self, config: KArAtConfig):
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
        karat_operator: FourierKArAtOperator,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        if seq_len != karat_operator.num_tokens:
            raise _size_error(self.config, f"a sequence of {seq_len} tokens")
        qkv = self.qkv(hidden_states).reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d]

        implementation = self.config._attn_implementation
        if implementation not in (None, "eager"):
            logger.warning_once(
                f"KArAt with attn_implementation={implementation!r}: that function replaces the learnable "
                "Fourier-KArAt operator (it receives it as `karat_operator`); use 'eager' for KArAt itself."
            )
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, karat_attention_forward)
        output_attentions = kwargs.pop("output_attentions", None)
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            karat_operator=karat_operator,
            output_attentions=output_attentions,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1).contiguous()
        return self.proj(attn_output), attn_weights


class KArAtMLP(nn.Module):
    """ViT MLP: ``fc2(act(fc1(x)))`` with dropout after each linear layer."""

    def __init__(self, config: KArAtConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.act(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))


class KArAtLayer(PreNormBlock):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (GELU MLP).

    Called as ``layer(hidden_states, karat_operator, **kwargs)``: attention uses the given Fourier-KArAt operator.
    """

    def __init__(self, config: KArAtConfig, drop_path: float = 0.0):
        super().__init__(config, KArAtAttention, KArAtMLP, drop_path=drop_path)


class KArAtPreTrainedModel(ModelCardMixin, PreTrainedModel):
    """Base class of the KArAt models: weight initialisation, the Transformers integration flags, and a model card
    (README.md from ``model_cards/karat.md``) written by ``save_pretrained`` / ``push_to_hub`` (:mod:`hf_kan.hub`)."""

    config: KArAtConfig
    config_class = KArAtConfig
    base_model_prefix = "karat"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["KArAtEmbeddings", "KArAtLayer"]
    # SDPA / flash / flex compute softmax attention, which is not what KArAt computes: "eager" (the default then)
    # dispatches to karat_attention_forward.
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_record_outputs = {"hidden_states": KArAtLayer, "attentions": KArAtAttention}

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal linear/conv weights, tokens and position embedding; scaled-normal KArAt operators."""
        std = self.config.initializer_range
        if isinstance(module, FourierKArAtOperator):
            coeff_std, weight_std = module.init_stds()
            init.normal_(module.fourier_coeffs, mean=0.0, std=coeff_std)
            init.normal_(module.low_rank_weight, mean=0.0, std=weight_std)
        else:
            init_vit_weights(module, std)


class KArAtModel(KArAtPreTrainedModel):
    """The bare KArAt encoder: returns the normalised token states and the normalised class token as pooler output."""

    def __init__(self, config: KArAtConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = KArAtEmbeddings(config)
        self.attention_operators = nn.ModuleList(
            FourierKArAtOperator(
                config.num_attention_heads,
                config.num_tokens,
                grid_size=config.karat_grid_size,
                rank=config.karat_rank,
                implementation=config.karat_implementation,
            )
            for _ in range(config.num_operators)
        )
        self.layers = nn.ModuleList([KArAtLayer(config, drop_path=rate) for rate in drop_path_rates(config)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> KArAtPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def operator_for_layer(self, layer_idx: int) -> FourierKArAtOperator:
        """The Fourier-KArAt operator layer ``layer_idx`` uses (its own, or the universal one)."""
        return self.attention_operators[layer_idx if self.config.karat_sharing == "blockwise" else 0]

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""Encode ``pixel_values`` ``[B, C, image_size, image_size]``.

        ``interpolate_pos_encoding=True`` is rejected with :class:`~hf_kan.errors.ImageSizeError`: the attention
        operators are tied to the configured token count. ``output_hidden_states=True`` returns the embeddings and
        the output of every block; ``output_attentions=True`` the learned ``[B, H, N, N]`` attention matrices.
        """
        if pixel_values is None:
            raise ValueError("KArAtModel needs pixel_values")
        if interpolate_pos_encoding:
            raise _size_error(self.config, "interpolate_pos_encoding=True")
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        hidden_states = self.embeddings(pixel_values)
        for layer_idx, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, self.operator_for_layer(layer_idx), **kwargs)
        sequence_output = self.layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0])


class KArAtForImageClassification(ClassTokenClassifierMixin, KArAtPreTrainedModel):
    """KArAt with a linear classifier on the (normalised) class token (``forward``: see
    :class:`~hf_kan.models.vit_common.ClassTokenClassifierMixin`)."""

    def __init__(self, config: KArAtConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.karat = KArAtModel(config)
        self.classifier = build_classifier(config)
        self.post_init()


__all__ = ["KArAtForImageClassification", "KArAtModel", "KArAtPreTrainedModel", "karat_attention_forward"]
