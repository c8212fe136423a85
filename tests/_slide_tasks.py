"""A slide model for tests: a CLAM-SB card over ViT-S/16 features and its checkpoint in the
layout CLAM writes after multi-GPU training with the SVM instance loss
(``attention_net.module.*``, ``instance_loss_fn.labels``), random values."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wsi_sampler.slide_models.architectures import build_architecture

VITS_DIM = 384


def write_clam_task(folder: Path, name: str = "tumour-vs-normal", seed: int = 5
                    ) -> tuple[Path, Path]:
    """(card, checkpoint) of a CLAM-SB head over ViT-S/16 features, in ``folder``."""
    card = folder / f"{name}.json"
    card.write_text(json.dumps({
        "kind": "slide", "name": name, "architecture": "clam_sb",
        "architecture_kwargs": {"gate": True, "size_arg": "small", "dropout": 0.25,
                                "k_sample": 8, "subtyping": False},
        "class_names": ["normal", "tumour"], "patch_encoder": "vit-s16",
        "description": "test head"}))
    with torch.device("meta"):
        shape = build_architecture("clam_sb", {"dropout": 0.25}, in_dim=VITS_DIM,
                                   class_names=("normal", "tumour"))
    gen = torch.Generator().manual_seed(seed)
    state = {k.replace("attention_net.", "attention_net.module.", 1):
             torch.randn(v.shape, generator=gen) * 0.1 for k, v in shape.state_dict().items()}
    state["instance_loss_fn.labels"] = torch.tensor([0, 1])
    ckpt = folder / f"{name}.s_0_checkpoint.pt"
    torch.save(state, ckpt)
    return card, ckpt
