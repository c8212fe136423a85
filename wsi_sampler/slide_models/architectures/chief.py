"""CHIEF's slide encoder (Wang et al., Nature 2024, "A pathology foundation model for cancer
diagnosis and prognosis prediction"), in the layout of its ``CHIEF_pretraining.pth``.

From the public description of hms-dbmi/CHIEF ``models/CHIEF.py`` (AGPL-3; written here,
not copied) and TRIDENT's ``CHIEFSlideEncoder`` (``CHIEF(size_arg="small", dropout=True,
n_classes=2)``, loaded strictly, the answer ``WSI_feature``):

- ``attention_net`` = Linear(768, 512), ReLU, Dropout(0.25), then gated attention
  (``attention_a`` Linear(512, 256) Tanh Dropout, ``attention_b`` Linear(512, 256) Sigmoid
  Dropout, ``attention_c`` Linear(256, 1)): CLAM-SB's layout, sizes small = [768, 512,
  256] (big [1024, 512, 384], large [2048, 1024, 512], xs [384, 256, 256]);
- ``classifiers`` Linear(512, n_classes), ``instance_classifiers`` n_classes x
  Linear(512, 2), ``att_head`` (``fc1`` Linear(512, 256), ``fc2`` Linear(256, 1)),
  ``text_to_vision`` Linear(768, 512) + ReLU + Dropout, and the ``organ_embedding`` buffer
  (19 x 768 text embeddings of the anatomical sites): pretraining parts, loaded all the same;
- the slide embedding (``WSI_feature``) is the attention-weighted mean of the **input**
  patch features, softmax(A_raw) x features: 768-d for CTransPath features.

Raw attention is (N, 1), before the softmax over patches.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ModelLoadError
from ._blocks import GatedAttention, SlideOutput, TanhAttention, attention_pool

__all__ = ["Chief"]

_SIZES = {"xs": (384, 256, 256), "small": (768, 512, 256), "big": (1024, 512, 384),
          "large": (2048, 1024, 512)}
ORGAN_SITES = 19
TEXT_DIM = 768


class _AttentionHead(nn.Module):
    """``att_head``: Linear, ReLU, Linear(…, 1), Sigmoid (a pretraining head)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(h))))


class Chief(nn.Module):
    """CHIEF's slide encoder (see the module docstring); ``embed_dim`` is the first size."""

    def __init__(self, gate: bool = True, size_arg: str = "small", dropout: bool = True,
                 n_classes: int = 2, embed_dim: int = 768) -> None:
        super().__init__()
        if size_arg not in _SIZES:
            raise ModelLoadError(f"CHIEF size_arg must be one of {', '.join(_SIZES)}, "
                                 f"got {size_arg!r}")
        in_dim, hidden, attn_dim = _SIZES[size_arg]
        if embed_dim != in_dim:
            raise ModelLoadError(f"CHIEF size_arg {size_arg!r} reads {in_dim}-d features, "
                                 f"not {embed_dim}-d")
        attention = (GatedAttention if gate else TanhAttention)(
            hidden, attn_dim, 1, dropout=0.25, with_dropout=bool(dropout))
        self.attention_net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), *([nn.Dropout(0.25)] if dropout else []),
            attention)
        self.classifiers = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(
            [nn.Linear(hidden, 2) for _ in range(n_classes)])
        self.att_head = _AttentionHead(hidden, attn_dim)
        self.text_to_vision = nn.Sequential(nn.Linear(TEXT_DIM, hidden), nn.ReLU(),
                                            nn.Dropout(0.25))
        self.register_buffer("organ_embedding", torch.zeros(ORGAN_SITES, TEXT_DIM))

    def forward(self, features: torch.Tensor) -> SlideOutput:
        layers = list(self.attention_net)
        h = features
        for layer in layers[:-1]:
            h = layer(h)
        scores: torch.Tensor = layers[-1](h)  # (N, 1)
        slide = attention_pool(scores, features)  # (1, 768): WSI_feature
        logits: torch.Tensor = self.classifiers(attention_pool(scores, h))[0]
        return SlideOutput(logits, scores, slide.flatten())
