"""KAT (Kolmogorov-Arnold Transformer) model configuration."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from ...errors import HFKanConfigError
from ...modules.rational_presets import available_rational_presets
from ..vit_config import (
    VIT_SIZE_FIELDS,
    check_heads_divide_hidden,
    check_patch_divides_image,
    check_positive,
    check_rates,
)

INIT_SCHEMES = ("variance_preserving", "trunc_normal")


@strict
class KATConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of a KAT model: a ViT whose MLPs are two Group-Rational KAN layers.

    Each block's MLP is ``rational_1 -> fc1 (D -> I) -> rational_2 -> fc2 (I -> D)``
    (Yang & Wang, "Kolmogorov-Arnold Transformer", arXiv 2409.10594). The defaults describe KAT-Tiny
    (``"kat-tiny"`` preset) at 224 px with patch 16.

    Args:
        hidden_size: embedding dimension D.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: attention heads per block (must divide ``hidden_size``).
        mlp_ratio: MLP hidden size as a multiple of D; used when ``intermediate_size`` is None.
        intermediate_size: MLP hidden size I (defaults to ``int(hidden_size * mlp_ratio)``).
        image_size: input resolution the position embedding is learned for (square images).
        patch_size: side of the square patches.
        num_channels: input image channels.
        qkv_bias: bias on the fused query/key/value projection.
        layer_norm_eps: LayerNorm epsilon.
        hidden_dropout_prob: dropout after the position embedding, attention projection and MLP.
        attention_probs_dropout_prob: dropout on attention probabilities.
        drop_path_rate: maximum stochastic-depth rate (linearly increasing over the blocks).
        rational_groups: channel groups G of each Group-Rational activation (divides D and I).
        rational_shared_numerator: one numerator for all groups (``[1, 6]``, the layout of the
            released checkpoints) if True; one per group (``[G, 6]``) otherwise.
        rational_1_init: preset ``rational_1`` (before fc1) starts from; ``"identity"`` in the paper.
        rational_2_init: preset ``rational_2`` (before fc2) starts from; ``"swish"`` in the released models.
        rational_backend: backend of the rational op (``"auto"`` picks the fastest available one;
            see :mod:`hf_kan.ops.rational`).
        init_scheme: ``"variance_preserving"`` (fc1/fc2 get kaiming-normal fan-in init with the gain of the
            rational that precedes them, the method of the paper) or ``"trunc_normal"`` (every linear layer
            trunc_normal(std=initializer_range), what the authors' released training code ends up doing).
        initializer_range: std of the truncated-normal init of the other weights, tokens and position embedding.
        out_features / out_indices: stages ``KATBackbone`` returns as feature maps (``"stem"`` is the embedding
            output, ``"stage{i}"`` the output of block i); defaults to the last block.
    """

    model_type = "kat"

    hidden_size: int = 192
    num_hidden_layers: int = 12
    num_attention_heads: int = 3
    mlp_ratio: float | int = 4.0
    intermediate_size: int | None = None
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    rational_groups: int = 8
    rational_shared_numerator: bool = True
    rational_1_init: str = "identity"
    rational_2_init: str = "swish"
    rational_backend: str = "auto"
    init_scheme: Literal["variance_preserving", "trunc_normal"] = "variance_preserving"
    initializer_range: float = 0.02
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = int(self.hidden_size * self.mlp_ratio)
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        def bad(msg: str) -> HFKanConfigError:
            return HFKanConfigError(f"KATConfig: {msg}")

        check_positive(self, VIT_SIZE_FIELDS + ("rational_groups",), bad)
        check_heads_divide_hidden(self, bad)
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % self.rational_groups:
                raise bad(
                    f"{name}={getattr(self, name)} is not divisible by rational_groups={self.rational_groups}; "
                    "pick a group count that divides both hidden_size and intermediate_size"
                )
        check_patch_divides_image(self, bad)
        presets = available_rational_presets()
        for name in ("rational_1_init", "rational_2_init"):
            if getattr(self, name) not in presets:
                raise bad(f"{name}={getattr(self, name)!r} is not a rational preset; choose one of {presets}")
        from ...ops.rational import BACKENDS

        if self.rational_backend not in BACKENDS:
            raise bad(f"rational_backend={self.rational_backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        if self.init_scheme not in INIT_SCHEMES:
            raise bad(f"init_scheme={self.init_scheme!r} is unknown; choose one of {', '.join(INIT_SCHEMES)}")
        check_rates(self, bad)

    @property
    def num_patches(self) -> int:
        """Number of patch tokens at ``image_size`` (the class token not included)."""
        return (self.image_size // self.patch_size) ** 2


__all__ = ["KATConfig"]
