"""Model scaffolding shared by hf-kan's ViT-like families (KAT, KArAt).

Only logic that is the same in every family lives here: the pre-norm residual block around a family's attention
and MLP, the stochastic-depth schedule, the ViT weight initialisation of the standard layers, and the class-token
classification head. Each
family keeps its own attention class (Transformers scans the model's module source for the attention interface
call) and its own embeddings forward (image-size policy).
"""

# (no `from __future__ import annotations`: Transformers inspects the `**kwargs: Unpack[TransformersKwargs]`
# annotation of the forwards at run time, e.g. to tell whether a model can return attentions)

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from ..modules.drop_path import DropPath
from ..modules.vit_embeddings import ClassTokenEmbeddings


class PreNormBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: ``x + drop_path(dropout(attn(norm1(x))))`` then ``x + drop_path(mlp(norm2(x)))``.

    ``attention_cls(config)`` must return ``(output, weights)``; ``mlp_cls(config)`` a tensor. Every positional or
    keyword argument after ``hidden_states`` in :meth:`forward` is handed to the attention (the mask for KAT, the
    layer's operator for KArAt).
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        attention_cls: Callable[[PreTrainedConfig], nn.Module],
        mlp_cls: Callable[[PreTrainedConfig], nn.Module],
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = attention_cls(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = mlp_cls(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, hidden_states: torch.Tensor, *attention_args: Any, **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        attn_output, _ = self.attention(self.norm1(hidden_states), *attention_args, **kwargs)
        hidden_states = hidden_states + self.drop_path(self.dropout(attn_output))
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states


def drop_path_rates(config: PreTrainedConfig) -> list[float]:
    """Stochastic-depth rate of each block, rising linearly from 0 to ``config.drop_path_rate``:
    ``rate_i = drop_path_rate * i / (L - 1)`` for ``i = 0 .. L-1``.

    Plain Python arithmetic (no tensor), so a model can be built on the meta device.
    """
    last = max(config.num_hidden_layers - 1, 1)
    return [config.drop_path_rate * i / last for i in range(config.num_hidden_layers)]


def init_vit_weights(module: nn.Module, std: float) -> None:
    """ViT initialisation of the standard layers: truncated-normal(0, ``std``) linear/conv weights with zero bias,
    unit/zero LayerNorm, truncated-normal(0, ``std``) class token and position embedding. Other modules are left
    untouched (families initialise their own layers before delegating here)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        init.trunc_normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, ClassTokenEmbeddings):
        init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
        init.trunc_normal_(module.cls_token, mean=0.0, std=std)


def build_classifier(config: PreTrainedConfig) -> nn.Module:
    """The classification head: ``Linear(hidden_size, num_labels)``, or the identity when ``num_labels == 0``."""
    return nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()


class ClassTokenClassifierMixin:
    """``forward`` of a ``*ForImageClassification`` model: the base model (the attribute named by
    ``base_model_prefix``) encodes the images, ``self.classifier`` maps its pooled class token to logits.

    Put it before the family's ``PreTrainedModel`` base; the family's ``__init__`` builds the base model and
    ``self.classifier = build_classifier(config)``.
    """

    @can_return_tuple
    def forward(
        self: PreTrainedModel,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""Classify ``pixel_values``; with ``labels`` ``[B]`` also returns the loss (cross-entropy for
        single-label classification, following ``config.problem_type`` like every Transformers classifier)."""
        encoder = getattr(self, self.base_model_prefix)
        outputs: BaseModelOutputWithPooling = encoder(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = ["ClassTokenClassifierMixin", "PreNormBlock", "build_classifier", "drop_path_rates", "init_vit_weights"]
