"""CONCH v1's image encoder (Lu et al., Nature Medicine 2024), as its feature extraction
uses it: ``encode_image(proj_contrast=False, normalize=False)``.

From the public description of mahmoodlab/CONCH (``open_clip_custom``; CC-BY-NC-ND-4.0,
written here, not copied) and its ``conch_ViT-B-16`` config:

- ``trunk``: timm's ``VisionTransformer`` (width 768, depth 12, 12 heads, MLP ratio 4,
  448 px, patch 16, no classifier, dynamic image size), its ``forward_features`` tokens
  (class token first, final norm applied);
- ``attn_pool_contrast``: an attentional pooler (one learned ``query`` of width 512, layer
  norms ``ln_q`` over it and ``ln_k`` over the 768-d tokens, ``nn.MultiheadAttention(512, 8,
  kdim=768, vdim=768)`` with the query attending to the tokens), its single output;
- ``ln_contrast``: LayerNorm(512). The 512-d result is the patch embedding.

The checkpoint (``pytorch_model.bin``) holds the whole CoCa model: the image encoder's
keys are under ``visual.``; the text tower, the caption decoder, the caption pooler, the
contrastive projection and the logit scale are not used for features (the card lists
them under ``unused_key_prefixes``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["AttentionalPooler", "ConchImageEncoder"]


class AttentionalPooler(nn.Module):
    """Learned queries attending to a token sequence (CoCa's attentional pooling)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1
                 ) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, context_dim) -> (B, n_queries, d_model)."""
        keys = self.ln_k(tokens).transpose(0, 1)  # (L, B, C): MultiheadAttention's layout
        query = self.ln_q(self.query).unsqueeze(1).expand(-1, tokens.shape[0], -1)
        out: torch.Tensor = self.attn(query, keys, keys, need_weights=False)[0]
        return out.transpose(0, 1)


class ConchImageEncoder(nn.Module):
    """(B, 3, 448, 448) normalised images -> (B, 512) CONCH v1 embeddings."""

    def __init__(self, image_size: int = 448, width: int = 768, embed_dim: int = 512,
                 pooler_heads: int = 8, **trunk: Any) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(**({
            "img_size": image_size, "patch_size": 16, "embed_dim": width, "depth": 12,
            "num_heads": 12, "mlp_ratio": 4.0, "num_classes": 0, "dynamic_img_size": True,
        } | trunk))
        self.attn_pool_contrast = AttentionalPooler(embed_dim, width, pooler_heads, 1)
        self.ln_contrast = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        pooled: torch.Tensor = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled
