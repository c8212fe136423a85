"""TransMIL (Shao et al., NeurIPS 2021), in the layout of its authors' code
(szc19990412/TransMIL ``models/TransMIL.py``), described here:

``_fc1`` = Linear(in_dim, 512), ReLU; the sequence is padded to a square number of tokens by
repeating its first rows, a ``cls_token`` (1, 1, 512) is prepended; ``layer1`` and
``layer2`` are pre-norm residual blocks (``norm`` LayerNorm, ``attn`` Nyström attention:
8 heads of 64, 256 landmarks, 6 pseudo-inverse iterations, a residual depth-wise
convolution over the values); between them ``pos_layer`` (PPEG) adds depth-wise 7×7, 5×5
and 3×3 convolutions (``proj``, ``proj1``, ``proj2``) of the patch tokens laid out on the
square grid; ``norm`` then ``_fc2`` = Linear(512, n_classes) classify the class token.

The attention itself is the ``nystrom-attention`` package's ``NystromAttention`` (MIT), the
module the original code imports, so its keys (``to_qkv``, ``to_out.0``, ``res_conv``) are
the checkpoint's. ``in_dim`` (ours; the original fixes 1024) admits other encoders.
TransMIL has no per-patch score: it returns no attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...errors import ModelLoadError
from ._blocks import SlideOutput

__all__ = ["TransMIL"]

DIM = 512


def _nystrom(dim: int) -> nn.Module:
    try:
        from nystrom_attention import NystromAttention
    except ImportError as exc:
        raise ModelLoadError("TransMIL needs nystrom-attention: pip install "
                             "'wsi-sampler[mil]'") from exc
    module: nn.Module = NystromAttention(dim=dim, dim_head=dim // 8, heads=8,
                                         num_landmarks=dim // 2, pinv_iterations=6,
                                         residual=True, dropout=0.1)
    return module


class _TransLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _nystrom(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.attn(self.norm(x))
        return out


class _PPEG(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        mixed = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls, mixed.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """TransMIL (see the module docstring)."""

    def __init__(self, n_classes: int = 2, in_dim: int = 1024, **unused: Any) -> None:
        super().__init__()
        if unused:
            raise ModelLoadError(f"TransMIL takes n_classes and in_dim, not {sorted(unused)}")
        self.pos_layer = _PPEG(DIM)
        self._fc1 = nn.Sequential(nn.Linear(in_dim, DIM), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.layer1 = _TransLayer(DIM)
        self.layer2 = _TransLayer(DIM)
        self.norm = nn.LayerNorm(DIM)
        self._fc2 = nn.Linear(DIM, n_classes)

    def forward(self, features: torch.Tensor) -> SlideOutput:
        h = self._fc1(features)[None]
        side = math.ceil(math.sqrt(h.shape[1]))
        h = torch.cat([h, h[:, :side * side - h.shape[1]]], dim=1)
        h = torch.cat([self.cls_token, h], dim=1)
        h = self.pos_layer(self.layer1(h), side)
        embedding = self.norm(self.layer2(h))[0, 0]
        return SlideOutput(self._fc2(embedding), None, embedding)
