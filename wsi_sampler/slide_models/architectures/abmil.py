"""ABMIL as MIL-Lab trains and publishes it (``ABMIL`` in ``src/models/abmil.py``).

From the public description of mahmoodlab/MIL-Lab (CC-BY-NC-ND: read, not copied) and Ilse
et al. 2018. ``ABMIL(in_dim=1024, embed_dim=512, num_fc_layers=1, dropout=0.25,
attn_dim=384, gate=True, num_classes=2)``:

- ``patch_embed``: ``num_fc_layers - 1`` blocks of Linear(…, embed_dim), ReLU, Dropout, then
  Linear(…, embed_dim), ReLU (MIL-Lab's ``create_mlp(end_with_fc=False)``);
- ``global_attn``: gated (``attention_a/b/c``) or not (``module``), each with its dropout
  layer, one branch, hidden size ``attn_dim``;
- ``classifier``: Linear(embed_dim, num_classes), absent when ``num_classes`` is 0 (a slide
  encoder: FEATHER "does not include a classification head", MIL-Lab README).

Published checkpoints (Hugging Face ``PreTrainedModel`` safetensors) wrap the model as
``model.``; the prefix is found and stripped when loading.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ModelLoadError
from ._blocks import GatedAttention, SlideOutput, TanhAttention, attention_pool

__all__ = ["ABMIL", "mlp_embedding"]


def mlp_embedding(in_dim: int, embed_dim: int, num_fc_layers: int, dropout: float
                  ) -> nn.Sequential:
    """(Linear, ReLU, Dropout) × (num_fc_layers - 1), then Linear, ReLU."""
    if num_fc_layers < 1:
        raise ModelLoadError(f"num_fc_layers must be >= 1, got {num_fc_layers}")
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(num_fc_layers - 1):
        layers += [nn.Linear(width, embed_dim), nn.ReLU(), nn.Dropout(dropout)]
        width = embed_dim
    layers += [nn.Linear(width, embed_dim), nn.ReLU()]
    return nn.Sequential(*layers)


class ABMIL(nn.Module):
    """Attention-based MIL (see the module docstring)."""

    def __init__(self, in_dim: int = 1024, embed_dim: int = 512, num_fc_layers: int = 1,
                 dropout: float = 0.25, attn_dim: int = 384, gate: bool = True,
                 num_classes: int = 2) -> None:
        super().__init__()
        if num_classes < 0:
            raise ModelLoadError(f"ABMIL needs num_classes >= 0, got {num_classes}")
        self.patch_embed = mlp_embedding(in_dim, embed_dim, num_fc_layers, dropout)
        self.global_attn = (GatedAttention if gate else TanhAttention)(
            embed_dim, attn_dim, 1, dropout=dropout, with_dropout=True)
        # MIL-Lab builds no classifier for num_classes=0: FEATHER's slide encoders
        if num_classes > 0:
            self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, features: torch.Tensor) -> SlideOutput:
        h = self.patch_embed(features)
        scores = self.global_attn(h)
        pooled = attention_pool(scores, h)[0]
        logits = self.classifier(pooled) if hasattr(self, "classifier") else pooled[:0]
        return SlideOutput(logits, scores, pooled)
