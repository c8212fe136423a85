"""MADELEINE's slide encoder (Jaume et al., ECCV 2024, "Multistain pretraining for slide
representation learning in pathology"), in the layout of its ``model.pt``.

From the public description of mahmoodlab/MADELEINE ``madeleine/models/Model.py`` and
``abmil.py`` (CC-BY-NC-ND-4.0; written here, not copied), H&E only, no stain encoding:

- ``wsi_embedders.pre_attn``: three times Linear, LayerNorm, GELU, Dropout(0.1):
  patch_dim -> hidden, hidden -> hidden, hidden -> hidden x n_heads;
- the tokens split into ``n_heads`` heads (``b t (e c) -> b t e c``: channel e * n_heads + c
  is dimension e of head c), each head pooled by its own gated attention
  ``wsi_embedders.attn.{c}`` (``attention_a`` Linear(hidden, 512) Tanh Dropout,
  ``attention_b`` Linear(hidden, 512) Sigmoid Dropout, ``attention_c`` Linear(512, 1)),
  softmax over the patches;
- the pooled (hidden, n_heads) flattened the same way and projected by ``projector``
  Linear(hidden x n_heads, hidden): the slide embedding (512-d with MADELEINE's config);
- ``token_projector`` Linear(hidden x n_heads, 128): a pretraining head, loaded all the
  same.

Raw attention is (N, n_heads), before the softmax over patches.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import GatedAttention, SlideOutput, attention_pool

__all__ = ["Madeleine"]

ATTENTION_DIM = 512
TOKEN_DIM = 128


def _block(i: int, o: int) -> list[nn.Module]:
    return [nn.Linear(i, o), nn.LayerNorm(o), nn.GELU(), nn.Dropout(0.1)]


class _Embedder(nn.Module):
    """``wsi_embedders``: the pre-attention network and one attention network per head."""

    def __init__(self, patch_dim: int, hidden: int, n_heads: int) -> None:
        super().__init__()
        self.pre_attn = nn.Sequential(*_block(patch_dim, hidden), *_block(hidden, hidden),
                                      *_block(hidden, hidden * n_heads))
        self.attn = nn.ModuleList(
            [GatedAttention(hidden, ATTENTION_DIM, 1, dropout=0.25) for _ in range(n_heads)])


class Madeleine(nn.Module):
    """MADELEINE's H&E slide encoder (see the module docstring)."""

    def __init__(self, patch_embedding_dim: int = 512, wsi_encoder_hidden_dim: int = 512,
                 n_heads: int = 4, activation: str = "softmax", n_classes: int = 0) -> None:
        super().__init__()
        if activation != "softmax":
            raise ValueError(f"MADELEINE's released model pools with softmax, not {activation}")
        if n_classes:
            raise ValueError("MADELEINE is a slide encoder: n_classes must be 0")
        self.n_heads, self.hidden = n_heads, wsi_encoder_hidden_dim
        self.wsi_embedders = _Embedder(patch_embedding_dim, wsi_encoder_hidden_dim, n_heads)
        self.token_projector = nn.Linear(wsi_encoder_hidden_dim * n_heads, TOKEN_DIM)
        self.projector = nn.Linear(wsi_encoder_hidden_dim * n_heads, wsi_encoder_hidden_dim)

    def forward(self, features: torch.Tensor) -> SlideOutput:
        tokens = self.wsi_embedders.pre_attn(features)  # (N, hidden * heads)
        heads = tokens.view(len(features), self.hidden, self.n_heads)  # (N, e, c)
        scores = torch.cat([attn(heads[:, :, c]) for c, attn in
                            enumerate(self.wsi_embedders.attn)], dim=1)  # (N, heads)
        pooled = torch.stack([attention_pool(scores[:, c:c + 1], heads[:, :, c])[0]
                              for c in range(self.n_heads)], dim=1)  # (e, c)
        embedding = self.projector(pooled.reshape(1, -1))[0]
        return SlideOutput(torch.zeros(0, device=features.device), scores, embedding)
