"""wsi-sampler: whole-slide tissue detection, patch planning, sampling and extraction.

Coordinates are level-0 pixels in every public function, file and response.
"""

from __future__ import annotations

from .errors import (
    CorruptSlideError,
    EmptyPlanError,
    InvalidRequestError,
    MissingMppError,
    SlideNotFoundError,
    UnsupportedFormatError,
    WsiSamplerError,
)
from .extract import Extractor, PatchBatch
from .plan import PatchPlan, PlanParams, TissueMask, compute_tissue_mask, make_plan, medgemma_params
from .slide import Slide, open_slide
from .tissue import TissueParams, detect_tissue

__version__ = "0.1.0"

__all__ = [
    "CorruptSlideError",
    "EmptyPlanError",
    "Extractor",
    "InvalidRequestError",
    "MissingMppError",
    "PatchBatch",
    "PatchPlan",
    "PlanParams",
    "Slide",
    "SlideNotFoundError",
    "TissueMask",
    "TissueParams",
    "UnsupportedFormatError",
    "WsiSamplerError",
    "__version__",
    "compute_tissue_mask",
    "detect_tissue",
    "make_plan",
    "medgemma_params",
    "open_slide",
]
