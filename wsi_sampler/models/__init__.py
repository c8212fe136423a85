"""Models: cards, the built-in ``tissue-qc``, the encoder catalogue, loaders for local files,
the torch runtime."""

from __future__ import annotations

from .card import ModelCard, Normalization, OutputSpec, Pooling, Provenance, load_card
from .catalogue import catalogue_card, catalogue_names
from .loaders import BUILTIN_MODELS, load_model, preflight, resolve_card
from .runtime import Model, Predictions, select_device
from .tissue_qc import QC_THRESHOLDS, TissueQC, tissue_qc_card

__all__ = [
    "BUILTIN_MODELS",
    "QC_THRESHOLDS",
    "Model",
    "ModelCard",
    "Normalization",
    "OutputSpec",
    "Pooling",
    "Predictions",
    "Provenance",
    "TissueQC",
    "catalogue_card",
    "catalogue_names",
    "load_card",
    "load_model",
    "preflight",
    "resolve_card",
    "select_device",
    "tissue_qc_card",
]
