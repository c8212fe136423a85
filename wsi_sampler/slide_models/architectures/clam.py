"""CLAM's slide models, in the layout its training code saves (``s_{fold}_checkpoint.pt``).

From the public description of mahmoodlab/CLAM (``models/model_clam.py``,
``models/model_mil.py``; Lu et al., Nat. Biomed. Eng. 2021), written here, not copied (CLAM
is GPL-3). Constructor arguments keep CLAM's names.

- ``CLAM_SB(gate=True, size_arg="small", dropout=0., k_sample=8, n_classes=2, subtyping=False,
  embed_dim=1024)``: ``size_arg`` small = [embed_dim, 512, 256], big = [embed_dim, 512, 384].
  ``attention_net`` = Linear(embed_dim, 512), ReLU, Dropout, then the attention network
  (gated: ``attention_a/b/c``; not: ``module``), one branch; ``classifiers`` =
  Linear(512, n_classes); ``instance_classifiers`` = n_classes × Linear(512, 2) (used only in
  training, loaded all the same). Raw attention ``A_raw`` is (1, N); the bag embedding is
  softmax(A_raw) · h.
- ``CLAM_MB``: the same with one attention branch per class (A_raw (n_classes, N)) and
  ``classifiers`` = n_classes × Linear(512, 1), class c scored from its own branch.
- ``MIL_fc`` (2 classes) / ``MIL_fc_mc`` (more): ``fc`` = Linear(embed_dim, 512), ReLU,
  Dropout; ``classifier`` (2 classes) or ``classifiers`` = Linear(512, n_classes). Every patch
  is classified; the slide takes the logits of its top patch (highest class-1 probability;
  multi-class: the highest probability of any class).

``k_sample`` and ``subtyping`` only shape CLAM's training loss; they are accepted so a card
can carry the training arguments as they were.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ModelLoadError
from ._blocks import GatedAttention, SlideOutput, TanhAttention, attention_pool

__all__ = ["ClamMB", "ClamSB", "MilFC"]

_SIZES = {"small": (512, 256), "big": (512, 384)}


def _sizes(size_arg: str) -> tuple[int, int]:
    if size_arg not in _SIZES:
        raise ModelLoadError(f"CLAM size_arg must be 'small' or 'big', got {size_arg!r}")
    return _SIZES[size_arg]


class ClamSB(nn.Module):
    """CLAM single-branch (see the module docstring)."""

    branches_per_class = False

    def __init__(self, gate: bool = True, size_arg: str = "small", dropout: float = 0.0,
                 k_sample: int = 8, n_classes: int = 2, subtyping: bool = False,
                 embed_dim: int = 1024) -> None:
        super().__init__()
        hidden, attn_dim = _sizes(size_arg)
        branches = n_classes if self.branches_per_class else 1
        attention = (GatedAttention if gate else TanhAttention)(
            hidden, attn_dim, branches, dropout=float(dropout), with_dropout=bool(dropout))
        self.attention_net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(),
                                           nn.Dropout(float(dropout)), attention)
        self.classifiers: nn.Module = self._bag_classifiers(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(
            [nn.Linear(hidden, 2) for _ in range(n_classes)])
        self.n_classes, self.k_sample, self.subtyping = n_classes, k_sample, subtyping

    @staticmethod
    def _bag_classifiers(hidden: int, n_classes: int) -> nn.Module:
        return nn.Linear(hidden, n_classes)

    def embed(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 512) patch embeddings after ``fc`` and their (N, K) raw attention."""
        h = features
        for layer in list(self.attention_net)[:3]:
            h = layer(h)
        return h, self.attention_net[3](h)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifiers(pooled)[0]
        return logits

    def forward(self, features: torch.Tensor) -> SlideOutput:
        h, scores = self.embed(features)
        pooled = attention_pool(scores, h)
        return SlideOutput(self.classify(pooled), scores, pooled.flatten())


class ClamMB(ClamSB):
    """CLAM multi-branch: one attention branch and one bag classifier per class."""

    branches_per_class = True

    @staticmethod
    def _bag_classifiers(hidden: int, n_classes: int) -> nn.Module:
        return nn.ModuleList([nn.Linear(hidden, 1) for _ in range(n_classes)])

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.classifiers, nn.ModuleList)
        return torch.cat([head(pooled[c]) for c, head in enumerate(self.classifiers)])


class MilFC(nn.Module):
    """CLAM's instance-level baseline (``MIL_fc`` for 2 classes, ``MIL_fc_mc`` for more)."""

    def __init__(self, size_arg: str = "small", dropout: float = 0.0, n_classes: int = 2,
                 top_k: int = 1, embed_dim: int = 1024) -> None:
        super().__init__()
        if size_arg != "small":
            raise ModelLoadError(f"MIL_fc has size_arg 'small' only, got {size_arg!r}")
        if top_k != 1:
            raise ModelLoadError(f"MIL_fc is evaluated with top_k=1, got {top_k}")
        if n_classes < 2:
            raise ModelLoadError(f"MIL_fc needs n_classes >= 2, got {n_classes}")
        self.fc = nn.Sequential(nn.Linear(embed_dim, 512), nn.ReLU(), nn.Dropout(dropout))
        head = nn.Linear(512, n_classes)
        # CLAM names the layer by the class count: classifier (2), classifiers (> 2)
        if n_classes == 2:
            self.classifier = head
        else:
            self.classifiers = head
        self.n_classes = n_classes

    def forward(self, features: torch.Tensor) -> SlideOutput:
        h = self.fc(features)
        head = self.classifier if self.n_classes == 2 else self.classifiers
        logits: torch.Tensor = head(h)  # (N, C): per-patch scores before the softmax
        probs = torch.softmax(logits, dim=1)
        if self.n_classes == 2:
            top = int(torch.argmax(probs[:, 1]))
        else:
            top = int(torch.argmax(probs.flatten())) // self.n_classes
        return SlideOutput(logits[top], logits, h[top])
