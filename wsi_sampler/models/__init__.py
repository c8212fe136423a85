"""Models: cards, the built-in ``tissue-qc``, the encoder catalogue, loaders for local files,
the torch runtime. Cards, the catalogue and card resolution need no torch; the names that
do (the runtime, loaders, ``TissueQC``) are imported on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .card import ModelCard, Normalization, OutputSpec, Pooling, Provenance, load_card
from .catalogue import catalogue_card, catalogue_names
from .resolve import BUILTIN_MODELS, preflight, resolve_card
from .tissue_qc_card import QC_THRESHOLDS, tissue_qc_card

if TYPE_CHECKING:
    from .loaders import load_model
    from .runtime import Model, Predictions, select_device
    from .tissue_qc import TissueQC

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

_TORCH_HOMES = {"load_model": ".loaders", "Model": ".runtime", "Predictions": ".runtime",
                "select_device": ".runtime", "TissueQC": ".tissue_qc"}

__getattr__ = lazy_attributes(__name__, _TORCH_HOMES)
