"""ViT input embeddings (Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv 2010.11929).

Shared by the hf-kan ViT-like families (KAT, KArAt): the patch projection and the class-token / position-embedding
scaffolding. What a family does about image sizes (KAT resizes its position embedding, KArAt is fixed to one size)
stays in the family's own ``*Embeddings`` subclass.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig

from ..errors import ImageSizeError


class PatchEmbeddings(nn.Module):
    """Split ``pixel_values`` ``[B, C, H, W]`` into patches and project them: ``[B, (H/p)*(W/p), D]``.

    The projection is a ``p x p`` convolution with stride ``p`` (parameter names ``projection.weight`` /
    ``projection.bias``, as in Transformers' ViT). ``model_name`` only labels the error messages.
    """

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int, model_name: str = "the model"):
        super().__init__()
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.model_name = model_name
        self.projection = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def check_layout(self, pixel_values: torch.Tensor) -> None:
        """Raise :class:`~hf_kan.errors.ImageSizeError` unless ``pixel_values`` is ``[batch, num_channels, H, W]``."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.num_channels:
            raise ImageSizeError(
                f"{self.model_name} expects pixel_values of shape [batch, {self.num_channels}, height, width], "
                f"got {tuple(pixel_values.shape)}"
            )

    def project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch tokens ``[B, (H/p)*(W/p), D]`` of already validated ``pixel_values``."""
        return self.projection(pixel_values).flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_layout(pixel_values)
        return self.project(pixel_values)


class ClassTokenEmbeddings(nn.Module):
    """Class token + patch embeddings + learned position embedding, followed by dropout.

    Holds ``cls_token`` ``[1, 1, D]``, ``patch_embeddings`` and ``position_embeddings`` ``[1, num_positions, D]``
    (zeros here; the model's ``_init_weights`` draws them). Subclasses write ``forward``: they validate the image
    size, pick the position embedding to add and call :meth:`add_class_token_and_position`.
    """

    def __init__(self, config: PreTrainedConfig, patch_embeddings: PatchEmbeddings, num_positions: int):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = patch_embeddings
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def add_class_token_and_position(
        self, patch_tokens: torch.Tensor, position_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """``dropout(concat(cls_token, patch_tokens) + position_embeddings)`` for ``patch_tokens`` ``[B, P, D]``."""
        batch_size = patch_tokens.shape[0]
        embeddings = torch.cat((self.cls_token.expand(batch_size, -1, -1), patch_tokens), dim=1)
        return self.dropout(embeddings + position_embeddings)


__all__ = ["ClassTokenEmbeddings", "PatchEmbeddings"]
