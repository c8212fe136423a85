"""Slide-level models: one answer per slide from its bag of patch embeddings.

Cards (``"kind": "slide"``: :mod:`.card`) name an architecture (CLAM-SB/MB, CLAM's MIL_fc,
MIL-Lab's ABMIL, TRIDENT's ABMIL, TransMIL, mean pooling: :mod:`.architectures`) with the
training code's own arguments, the patch encoder the features come from and the classes.
Checkpoints load strictly in the layouts their training code writes (:mod:`.checkpoints`);
bags are read in our, TRIDENT's and CLAM's layouts (:mod:`.bags`); answers come with raw
and normalised attention, a CLAM-style heatmap, QuPath GeoJSON and the top/bottom patches
(:mod:`.outputs`). :func:`predict_slide` runs the whole chain. Needs torch (imported on
first use of a name that does); cards need none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .card import (
    SlideModelCard,
    SlideProvenance,
    embedding_dim_of,
    encoder_card_of,
    load_slide_card,
)

if TYPE_CHECKING:
    from .bags import Bag, read_bag
    from .model import SlideModel, SlidePrediction, load_slide_model
    from .outputs import HeatmapOptions
    from .predict import SlideAnswer, expand_inputs, predict_bag, predict_slide

__all__ = ["Bag", "HeatmapOptions", "SlideAnswer", "SlideModel", "SlideModelCard",
           "SlidePrediction", "SlideProvenance", "embedding_dim_of", "encoder_card_of",
           "expand_inputs", "load_slide_card", "load_slide_model", "predict_bag",
           "predict_slide", "read_bag"]

__getattr__ = lazy_attributes(__name__, {
    "Bag": ".bags", "read_bag": ".bags", "SlideModel": ".model", "SlidePrediction": ".model",
    "load_slide_model": ".model", "HeatmapOptions": ".outputs", "SlideAnswer": ".predict",
    "expand_inputs": ".predict", "predict_bag": ".predict", "predict_slide": ".predict"})
