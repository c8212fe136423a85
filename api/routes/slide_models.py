"""/v1/slide-models and /v1/slides/{id}/slide-predictions: the configured slide-level
models, and a slide's answer from them streamed as NDJSON (progress while its patches are
encoded, then one result per model)."""

from __future__ import annotations

import threading

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from ..deps import ServicesDep
from ..schemas import (
    ErrorBody,
    SlideModelInfo,
    SlideModelList,
    SlidePredictionRequest,
    binary_content,
)
from ..slide_predictions import slide_prediction_chunks
from ..streaming import slide_stream
from .sampling import STREAM_ERRORS, open_and_plan

router = APIRouter(tags=["slide models"])


@router.get("/v1/slide-models", response_model=SlideModelList)
async def list_slide_models(services: ServicesDep) -> SlideModelList:
    """The slide-level models this service answers with (WSI_SLIDE_MODELS)."""
    return SlideModelList(slide_models=[
        SlideModelInfo(name=m.name, version=m.card.version, architecture=m.card.architecture,
                       class_names=list(m.card.class_names), patch_encoder=m.encoder_card.name,
                       attention=m.card.architecture not in ("transmil", "mean"),
                       description=m.card.description)
        for m in services.slide_models.values()])


@router.post(
    "/v1/slides/{slide_id}/slide-predictions", response_class=StreamingResponse, responses={
        **STREAM_ERRORS,
        503: {"model": ErrorBody, "description": "The model worker is not ready"},
        200: {"content": binary_content("application/x-ndjson"),
              "description": "Progress records, one result record per slide model, then a "
                             "summary record"},
    },
)
async def slide_predictions(slide_id: str, req: SlidePredictionRequest,
                            services: ServicesDep) -> StreamingResponse:
    """A slide-level answer: ``{"type": "progress", "patches_done", "patches_total"}`` while
    the slide's patches are encoded, then per slide model ``{"type": "result",
    "slide_model", "probabilities", "predicted_class", "logits", "n_patches", …}`` (with
    ``include_attention``: each patch's raw attention and level-0 box), then
    ``{"type": "summary"}``. Every patch of the plan is encoded (no request size limit
    applies: the answer is one record); the stream failure contract of /predictions holds."""
    models = services.slide_models_for(req.slide_models)
    worker = services.require_worker()
    # the answer is one record, whatever the plan's size: max_patches_per_request is for
    # streams of patches
    slide, plan = await services.stream_work(open_and_plan, services, slide_id, req,
                                             for_model=True, streamed=False)
    chunks = slide_prediction_chunks(slide, slide_id, plan, worker, models,
                                     batch_size=services.settings.batch_size,
                                     metrics=services.metrics, cancel=threading.Event(),
                                     include_attention=req.include_attention)
    return slide_stream(services, slide, len(plan), chunks, "application/x-ndjson")
