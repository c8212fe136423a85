"""wsi-sampler: whole-slide tissue detection, patch planning, sampling and extraction.

Coordinates are level-0 pixels in every public function, file and response.
"""

from __future__ import annotations

from ._lazy import lazy_attributes
from .errors import (
    CorruptSlideError,
    EmptyPlanError,
    InvalidRequestError,
    MissingMppError,
    SlideNotFoundError,
    SlideStoreError,
    SlideStoreUnavailableError,
    UnsupportedFormatError,
    WsiSamplerError,
)
from .extract import Extractor, PatchBatch
from .plan import PatchPlan, PlanParams, TissueMask, compute_tissue_mask, make_plan, medgemma_params
from .slide import Slide, open_slide
from .tissue import TissueParams, detect_tissue

__version__ = "0.1.0"

# Names that load torch are imported on first use, so `import wsi_sampler` stays light.
_LAZY = dict.fromkeys(("InProcessWorker", "RemoteWorker", "Worker", "open_worker"), ".worker")
_LAZY |= {"load_model": ".models", "score_slide": ".scoring", "OutputOptions": ".scoring"}
_LAZY |= dict.fromkeys(("predict_slide", "load_slide_model", "read_bag"), ".slide_models")
__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "CorruptSlideError",
    "EmptyPlanError",
    "Extractor",
    "InProcessWorker",
    "InvalidRequestError",
    "OutputOptions",
    "MissingMppError",
    "PatchBatch",
    "PatchPlan",
    "PlanParams",
    "RemoteWorker",
    "Slide",
    "SlideNotFoundError",
    "SlideStoreError",
    "SlideStoreUnavailableError",
    "TissueMask",
    "TissueParams",
    "UnsupportedFormatError",
    "Worker",
    "WsiSamplerError",
    "__version__",
    "compute_tissue_mask",
    "detect_tissue",
    "load_model",
    "load_slide_model",
    "make_plan",
    "medgemma_params",
    "open_slide",
    "predict_slide",
    "read_bag",
    "score_slide",
    "open_worker",
]
