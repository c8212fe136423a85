"""Heads over a slide encoder's embedding: the linear probe and the small MLP that slide
foundation model papers train on frozen slide embeddings (TITAN, FEATHER, PRISM…).

- ``linear``: ``torch.nn.Linear(in_dim, n_classes)``, keys ``weight`` and ``bias`` (a
  logistic-regression probe exported from scikit-learn is the same two arrays:
  ``coef_`` → ``weight``, ``intercept_`` → ``bias``);
- ``mlp``: Linear(in_dim, hidden_dim), ReLU, Dropout, Linear(hidden_dim, n_classes): keys
  ``0.*`` and ``3.*``.

The checkpoint of a head holds the head alone; the slide encoder's own weights load into it
separately (``slide_encoder_file``), each strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import SlideOutput

__all__ = ["LinearHead", "MLPHead", "OverSlideEncoder"]


class LinearHead(nn.Linear):
    def __init__(self, in_dim: int = 512, n_classes: int = 2) -> None:
        super().__init__(in_dim, n_classes)


class MLPHead(nn.Sequential):
    def __init__(self, in_dim: int = 512, hidden_dim: int = 256, dropout: float = 0.0,
                 n_classes: int = 2) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden_dim, n_classes))


class OverSlideEncoder(nn.Module):
    """A slide encoder, then a head on its embedding; the encoder's attention is kept."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, features: torch.Tensor) -> SlideOutput:
        out = self.encoder(features)
        return SlideOutput(self.head(out.embedding), out.attention, out.embedding)
