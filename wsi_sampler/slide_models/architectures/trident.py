"""TRIDENT's ABMIL slide encoder with the classifier of its training tutorial.

From the public description of mahmoodlab/TRIDENT (CC-BY-NC-ND: read, not copied):
``ABMILSlideEncoder(input_feature_dim, n_heads, head_dim, dropout, gated)`` holds ``model``,
a ModuleDict of ``pre_attention_layers`` (Linear(F, F), GELU, Dropout(0.1)),
``image_pooler`` (the multi-head ABMIL of ``reusable_blocks/ABMIL.py``: per head
``attention_heads.i`` = Linear(F, head_dim), Tanh, Dropout; gated: ``gating_layers.i`` =
Linear(F, head_dim), Sigmoid, Dropout; ``branching_layers.i`` = Linear(head_dim, 1); with
several heads, ``condensing_layer`` = Linear(n_heads·F, F)) and ``post_attention_layers``
(Linear(F, F), GELU, Dropout(0.1)). Tutorial 3's ``BinaryClassificationModel(
input_feature_dim=768, n_heads=1, head_dim=512, dropout=0., gated=True, hidden_dim=256)``
keeps it as ``feature_encoder`` and adds ``classifier`` = Linear(F, hidden_dim), ReLU,
Linear(hidden_dim, 1). ``n_classes`` (ours, default 1 = the tutorial's single logit) widens
that last layer for multi-class heads.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ModelLoadError
from ._blocks import SlideOutput

__all__ = ["TridentABMIL"]


def _layer(width: int, out: int, act: nn.Module, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, out), act, nn.Dropout(dropout))


class _Pooler(nn.Module):
    def __init__(self, feature_dim: int, head_dim: int, n_heads: int, dropout: float,
                 gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.attention_heads = nn.ModuleList(
            [_layer(feature_dim, head_dim, nn.Tanh(), dropout) for _ in range(n_heads)])
        if gated:
            self.gating_layers = nn.ModuleList(
                [_layer(feature_dim, head_dim, nn.Sigmoid(), dropout) for _ in range(n_heads)])
        self.branching_layers = nn.ModuleList([nn.Linear(head_dim, 1) for _ in range(n_heads)])
        if n_heads > 1:
            self.condensing_layer = nn.Linear(n_heads * feature_dim, feature_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, pooled = [], []
        for i, head in enumerate(self.attention_heads):
            a = head(h)
            if self.gated:
                a = a * self.gating_layers[i](h)
            s = self.branching_layers[i](a)  # (N, 1)
            scores.append(s[:, 0])
            pooled.append(torch.softmax(s[:, 0], dim=0) @ h)
        joined = torch.cat(pooled)
        if len(pooled) > 1:
            joined = self.condensing_layer(joined)
        return joined, torch.stack(scores, dim=1)


class _SlideEncoder(nn.Module):
    def __init__(self, input_feature_dim: int, n_heads: int, head_dim: int, dropout: float,
                 gated: bool) -> None:
        super().__init__()
        self.model = nn.ModuleDict({
            "pre_attention_layers": _layer(input_feature_dim, input_feature_dim, nn.GELU(),
                                           0.1),
            "image_pooler": _Pooler(input_feature_dim, head_dim, n_heads, dropout, gated),
            "post_attention_layers": _layer(input_feature_dim, input_feature_dim, nn.GELU(),
                                            0.1),
        })


class TridentABMIL(nn.Module):
    """TRIDENT tutorial 3's classifier over its ABMIL slide encoder."""

    def __init__(self, input_feature_dim: int = 768, n_heads: int = 1, head_dim: int = 512,
                 dropout: float = 0.0, gated: bool = True, hidden_dim: int = 256,
                 n_classes: int = 1) -> None:
        super().__init__()
        if n_heads < 1 or n_classes < 1:
            raise ModelLoadError("trident_abmil needs n_heads >= 1 and n_classes >= 1")
        self.feature_encoder = _SlideEncoder(input_feature_dim, n_heads, head_dim, dropout,
                                             gated)
        self.classifier = nn.Sequential(nn.Linear(input_feature_dim, hidden_dim), nn.ReLU(),
                                        nn.Linear(hidden_dim, n_classes))

    def forward(self, features: torch.Tensor) -> SlideOutput:
        parts = self.feature_encoder.model
        h = parts["pre_attention_layers"](features)
        pooled, scores = parts["image_pooler"](h)
        embedding = parts["post_attention_layers"](pooled)
        return SlideOutput(self.classifier(embedding), scores, embedding)
