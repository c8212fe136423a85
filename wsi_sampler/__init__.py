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

# The worker API loads torch; it is imported on first use, so `import wsi_sampler` stays light.
_WORKER_NAMES = ("InProcessWorker", "RemoteWorker", "Worker", "open_worker")
_MODEL_NAMES = ("load_model",)
_SCORING_NAMES = ("score_slide", "OutputOptions")


def __getattr__(name: str) -> object:
    if name in _WORKER_NAMES:
        from . import worker

        return getattr(worker, name)
    if name in _MODEL_NAMES:
        from . import models

        return getattr(models, name)
    if name in _SCORING_NAMES:
        from . import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module 'wsi_sampler' has no attribute {name!r}")


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
    "make_plan",
    "medgemma_params",
    "open_slide",
    "score_slide",
    "open_worker",
]
