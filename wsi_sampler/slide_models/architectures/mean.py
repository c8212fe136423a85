"""The simplest slide model: the mean of the patch embeddings, then a linear classifier
(``classifier`` = Linear(in_dim, n_classes)). A baseline every MIL paper reports."""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import SlideOutput

__all__ = ["MeanPool"]


class MeanPool(nn.Module):
    def __init__(self, in_dim: int = 1024, n_classes: int = 2) -> None:
        super().__init__()
        if n_classes:  # none: the mean embedding itself (TRIDENT's mean-<encoder>)
            self.classifier = nn.Linear(in_dim, n_classes)

    def forward(self, features: torch.Tensor) -> SlideOutput:
        pooled = features.mean(dim=0)
        logits = self.classifier(pooled) if hasattr(self, "classifier") else pooled[:0]
        return SlideOutput(logits, None, pooled)
