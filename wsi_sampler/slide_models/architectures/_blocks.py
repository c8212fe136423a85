"""The pieces every attention-MIL layout is made of, and what each slide model returns.

Attention networks of Ilse et al. 2018 (https://arxiv.org/abs/1802.04712), eq. 8 and 9: a
patch embedding ``h`` gets the raw score ``w^T tanh(V h)`` (non-gated) or
``w^T (tanh(V h) * sigm(U h))`` (gated); a softmax over the patches turns the scores into
weights and the bag embedding is the weighted sum. CLAM and MIL-Lab keep ``V``, ``U`` and
``w`` in sub-modules called ``attention_a``, ``attention_b`` and ``attention_c`` (gated) or
one ``module`` sequence (non-gated); a dropout layer, where present, shifts the index of
the last linear layer in that sequence, so it is part of the layout even though inference
never drops anything.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["GatedAttention", "SlideOutput", "TanhAttention", "attention_pool"]


class SlideOutput(NamedTuple):
    """One slide's answer: ``logits`` (C,), ``attention`` (N, K) raw scores before the
    softmax over patches (None for models without patch scores), ``embedding`` the pooled
    slide representation (the input of the classifier)."""

    logits: torch.Tensor
    attention: torch.Tensor | None
    embedding: torch.Tensor


def _sequence(layers: list[nn.Module], dropout: float, with_dropout: bool) -> nn.Sequential:
    return nn.Sequential(*layers, *([nn.Dropout(dropout)] if with_dropout else []))


class TanhAttention(nn.Module):
    """``w^T tanh(V h)``: ``module`` = Linear(L, D), Tanh, [Dropout], Linear(D, K)."""

    def __init__(self, in_dim: int, hidden_dim: int, n_out: int, *, dropout: float = 0.0,
                 with_dropout: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.Tanh()]
        if with_dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden_dim, n_out))
        self.module = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.module(h)
        return out


class GatedAttention(nn.Module):
    """``w^T (tanh(V h) * sigm(U h))``: ``attention_a`` (V), ``attention_b`` (U),
    ``attention_c`` (w)."""

    def __init__(self, in_dim: int, hidden_dim: int, n_out: int, *, dropout: float = 0.0,
                 with_dropout: bool = True) -> None:
        super().__init__()
        self.attention_a = _sequence([nn.Linear(in_dim, hidden_dim), nn.Tanh()], dropout,
                                     with_dropout)
        self.attention_b = _sequence([nn.Linear(in_dim, hidden_dim), nn.Sigmoid()], dropout,
                                     with_dropout)
        self.attention_c = nn.Linear(hidden_dim, n_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.attention_c(self.attention_a(h) * self.attention_b(h))
        return out


def attention_pool(scores: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(K, D) bag embeddings: softmax of the (N, K) raw ``scores`` over the N patches,
    times the (N, D) patch embeddings ``h``."""
    weights = torch.softmax(scores.transpose(0, 1), dim=1)
    return weights @ h
