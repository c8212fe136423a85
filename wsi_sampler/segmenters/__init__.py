"""Deep tissue segmenters (HEST's DeepLabV3, GrandQC's tissue and artefact models) run over
whole slides, weights brought by the user: cards (:mod:`.card`, no torch), strict checkpoint
loading (:mod:`.model`) and tiled inference into a tissue mask or an artefact class map
(:mod:`.inference`). Torch is imported on first use of a name that needs it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .card import SegmenterCard, load_segmenter_card, segmenter_catalogue_names

if TYPE_CHECKING:
    from .inference import segment_artifacts, segment_slide
    from .model import Segmenter, build_segmenter, cached_segmenter, load_segmenter

__all__ = [
    "Segmenter",
    "SegmenterCard",
    "build_segmenter",
    "cached_segmenter",
    "load_segmenter",
    "load_segmenter_card",
    "segment_artifacts",
    "segment_slide",
    "segmenter_catalogue_names",
]

__getattr__ = lazy_attributes(__name__, {
    "segment_artifacts": ".inference", "segment_slide": ".inference", "Segmenter": ".model",
    "build_segmenter": ".model", "cached_segmenter": ".model", "load_segmenter": ".model"})
