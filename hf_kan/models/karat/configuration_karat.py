"""KArAt (Kolmogorov-Arnold Attention) model configuration."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...errors import HFKanConfigError
from ...modules.fourier_attention import OPERATOR_IMPLEMENTATIONS, FourierKArAtOperator
from ..vit_config import (
    VIT_SIZE_FIELDS,
    check_heads_divide_hidden,
    check_patch_divides_image,
    check_positive,
    check_rates,
)

SHARING_MODES = ("blockwise", "universal")


@strict
class KArAtConfig(PreTrainedConfig):
    r"""Configuration of a KArAt model: a ViT whose attention softmax is the learnable Fourier-KArAt operator.

    In every block the row-wise softmax over ``Q K^T / sqrt(d)`` is replaced by ``W @ Phi(row)``, ``Phi`` a
    Fourier-KAN layer with ``karat_grid_size`` frequencies mapping the ``N`` scores of a row to ``karat_rank``
    outputs (Maity et al., "Kolmogorov-Arnold Attention", arXiv 2503.10632; see
    :class:`hf_kan.modules.fourier_attention.FourierKArAtOperator`). The operator's parameters are indexed by token
    position, so a model is tied to ``image_size``: other sizes raise :class:`~hf_kan.errors.ImageSizeError`.
    The defaults describe KArAt-Tiny G3B (``"karat-tiny-g3b"`` preset) at 224 px with patch 16.

    Args:
        hidden_size: embedding dimension D.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: attention heads per block (must divide ``hidden_size``).
        mlp_ratio: MLP hidden size as a multiple of D; used when ``intermediate_size`` is None.
        intermediate_size: MLP hidden size I (defaults to ``int(hidden_size * mlp_ratio)``).
        hidden_act: activation of the MLP (``"gelu"``, as in ViT).
        image_size: side of the square input images; fixes the token count ``N = (image_size / patch_size)^2 + 1``.
        patch_size: side of the square patches.
        num_channels: input image channels.
        qkv_bias: bias on the fused query/key/value projection.
        layer_norm_eps: LayerNorm epsilon.
        hidden_dropout_prob: dropout after the position embedding, attention projection and MLP.
        attention_probs_dropout_prob: dropout on the learned attention matrix (forming it costs ``B*H*N*N`` memory).
        drop_path_rate: maximum stochastic-depth rate (linearly increasing over the blocks).
        karat_grid_size: number of Fourier frequencies G of each univariate function (paper: 3 for Tiny/Small,
            1 for Base).
        karat_rank: rank r of the operator (outputs of the KAN layer, columns of ``W``; paper: 12).
        karat_sharing: ``"blockwise"`` (one operator per layer, each with its own coefficients for every head) or
            ``"universal"`` (one operator per head shared by all layers).
        karat_implementation: ``"recompute"`` (memory-lean custom autograd, the default) or ``"reference"``
            (plain autograd of the formula; the naive baseline, much more memory).
        initializer_range: std of the truncated-normal init of linear layers, class token and position embedding.
            The operator has its own scaled-normal init (see ``FourierKArAtOperator``).
    """

    model_type = "karat"

    hidden_size: int = 192
    num_hidden_layers: int = 12
    num_attention_heads: int = 3
    mlp_ratio: float | int = 4.0
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    karat_grid_size: int = 3
    karat_rank: int = 12
    karat_sharing: Literal["blockwise", "universal"] = "blockwise"
    karat_implementation: Literal["recompute", "reference"] = "recompute"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = int(self.hidden_size * self.mlp_ratio)
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        def bad(msg: str) -> HFKanConfigError:
            return HFKanConfigError(f"KArAtConfig: {msg}")

        check_positive(self, VIT_SIZE_FIELDS + ("karat_grid_size", "karat_rank"), bad)
        check_heads_divide_hidden(self, bad)
        check_patch_divides_image(self, bad)
        if self.karat_sharing not in SHARING_MODES:
            raise bad(f"karat_sharing={self.karat_sharing!r} is unknown; choose one of {', '.join(SHARING_MODES)}")
        if self.karat_implementation not in OPERATOR_IMPLEMENTATIONS:
            raise bad(
                f"karat_implementation={self.karat_implementation!r} is unknown; "
                f"choose one of {', '.join(OPERATOR_IMPLEMENTATIONS)}"
            )
        check_rates(self, bad)

    @property
    def num_patches(self) -> int:
        """Number of patch tokens at ``image_size`` (the class token not included)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Token count ``N`` the attention operators are built for: patches plus the class token."""
        return self.num_patches + 1

    @property
    def num_operators(self) -> int:
        """Number of distinct Fourier-KArAt operators: one per layer (blockwise) or one in all (universal)."""
        return self.num_hidden_layers if self.karat_sharing == "blockwise" else 1

    @property
    def num_operator_parameters(self) -> int:
        """Parameters in all attention operators: ``num_operators * H * N * r * (2G + 1)``."""
        return self.num_operators * FourierKArAtOperator.num_parameters_formula(
            self.num_attention_heads, self.num_tokens, self.karat_grid_size, self.karat_rank
        )


__all__ = ["KArAtConfig"]
