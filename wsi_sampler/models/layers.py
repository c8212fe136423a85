"""Layers a card can name that timm does not have, written from their papers.

- ``ConvStem``: CTransPath's convolutional patch embedding (Wang et al., Medical Image
  Analysis 2022, "Transformer-based unsupervised contrastive learning for histopathological
  image classification"): in place of Swin's 4 x 4 patch partition, two 3 x 3 stride-2
  convolutions (no bias; batch norm and ReLU after each; embed/8 then embed/4 channels) and a
  1 x 1 convolution to the embedding width, then the patch norm. It takes the arguments
  timm's Swin gives its ``embed_layer`` and returns NHWC tokens, as timm's ``PatchEmbed``
  does for Swin.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["EMBED_LAYERS", "ConvStem"]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ConvStem(nn.Module):
    """CTransPath's stem: (B, 3, H, W) -> (B, H/4, W/4, embed_dim)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4,
                 in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: type[nn.Module] | None = None, **_: Any) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("ConvStem takes patch_size 4 and an embed_dim divisible by 8")
        self.img_size = _pair(img_size)
        self.patch_size = (4, 4)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        first, second = embed_dim // 8, embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, first, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(first), nn.ReLU(inplace=True),
            nn.Conv2d(first, second, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(second), nn.ReLU(inplace=True),
            nn.Conv2d(second, embed_dim, kernel_size=1))
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.norm(self.proj(x).permute(0, 2, 3, 1))
        return tokens


EMBED_LAYERS: dict[str, type[nn.Module]] = {"ConvStem": ConvStem}
"""``timm_kwargs.embed_layer`` names a card may use."""
