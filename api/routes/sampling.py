"""/v1/slides/{id}/plan, /patches and /predictions: plans, and patches or predictions
streamed as they are produced. Everything is validated before the first byte is sent."""

from __future__ import annotations

import threading
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from wsi_sampler import PatchPlan, Slide, make_plan
from wsi_sampler.errors import InvalidRequestError
from wsi_sampler.export import clam_h5_bytes
from wsi_sampler.scoring import model_plan_params

from ..deps import Services, ServicesDep
from ..schemas import ErrorBody, PatchRequest, PlanResponse, SamplingRequest, binary_content
from ..streaming import EmbeddingFormat, patch_chunks, prediction_chunks, slide_stream

router = APIRouter(prefix="/v1/slides", tags=["sampling"])
ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "Unknown slide id"},
    422: {"model": ErrorBody, "description": "Unsupported or corrupt slide, missing MPP "
                                             "(set mpp_override), or invalid parameters"},
}
STREAM_ERRORS: dict[int | str, dict[str, object]] = {
    **ERRORS,
    429: {"model": ErrorBody, "description": "Too many concurrent streams (see Retry-After)"},
}


def _check_size(plan: PatchPlan, limit: int, setting: str, hint: str) -> None:
    if len(plan) > limit:
        raise InvalidRequestError(
            f"the plan has {len(plan)} patches, more than {setting}={limit}; {hint}"
        )


def open_and_plan(
    services: Services, slide_id: str, req: SamplingRequest, for_model: bool = False,
    streamed: bool = True,
) -> tuple[Slide, PatchPlan]:
    """The open slide and its plan (``for_model``: at the worker's patch size and MPP);
    a plan whose patches are ``streamed`` to the client is held to max_patches_per_request."""
    slide = services.registry.open(slide_id, mpp_override=req.mpp_override)
    try:
        params = req.to_params(services.tissue_params)
        if for_model:
            params = model_plan_params(services.require_worker().card, params)
        plan = make_plan(slide, params)
        if streamed:
            _check_size(plan, services.settings.max_patches_per_request,
                        "max_patches_per_request",
                        "sample fewer (random/stratified with n_patches) or use a job")
    except BaseException:
        slide.close()
        raise
    return slide, plan


@router.post("/{slide_id}/plan", response_model=PlanResponse, responses=ERRORS)
async def plan(slide_id: str, req: SamplingRequest, services: ServicesDep) -> PlanResponse:
    """Sampling parameters in, level-0 patch coordinates out (all strategies, incl. medgemma)."""
    def run() -> PlanResponse:
        with services.registry.open(slide_id, mpp_override=req.mpp_override) as slide:
            plan_ = make_plan(slide, req.to_params(services.tissue_params))
        _check_size(plan_, services.settings.max_plan_patches, "max_plan_patches",
                    "sample fewer (random/stratified with n_patches) or use larger patches")
        d = plan_.to_dict()
        d.pop("params")
        return PlanResponse(slide_id=slide_id, message=plan_.note(), **d)

    return await services.slide_work(run)


@router.post(
    "/{slide_id}/plan.h5", response_class=Response, responses={
        **ERRORS, 200: {"content": binary_content("application/x-hdf5"),
                        "description": "coords (N, 2) level-0 with CLAM's and TRIDENT's "
                                       "attributes, as `wsi-sampler plan --out coords.h5`"}})
async def plan_h5(slide_id: str, req: SamplingRequest, services: ServicesDep) -> Response:
    """The plan as the patch-coordinate h5 CLAM's and TRIDENT's feature extraction read."""
    def run() -> bytes:
        with services.registry.open(slide_id, mpp_override=req.mpp_override) as slide:
            plan_ = make_plan(slide, req.to_params(services.tissue_params))
            _check_size(plan_, services.settings.max_plan_patches, "max_plan_patches",
                        "sample fewer (random/stratified with n_patches) or use larger "
                        "patches")
            return clam_h5_bytes(plan_, slide)

    data = await services.slide_work(run)
    return Response(data, media_type="application/x-hdf5",
                    headers={"Content-Disposition": 'attachment; filename="coords.h5"'})


@router.post(
    "/{slide_id}/patches", response_class=StreamingResponse, responses={
        **STREAM_ERRORS,
        200: {"content": binary_content("application/x-tar", "application/x-ndjson"),
              "description": "WebDataset tar (000042.png + 000042.json) or NDJSON lines"},
    },
)
async def patches(
    slide_id: str, req: PatchRequest, services: ServicesDep,
    output: Annotated[Literal["tar", "ndjson"], Query(alias="format")] = "tar",
) -> StreamingResponse:
    """Stream the planned patches as they are read (tar or NDJSON with base64 images)."""
    slide, plan_ = await services.stream_work(open_and_plan, services, slide_id, req)
    chunks = patch_chunks(slide, slide_id, plan_, as_tar=output == "tar",
                          image_format=req.image_format, metrics=services.metrics)
    media = "application/x-tar" if output == "tar" else "application/x-ndjson"
    return slide_stream(services, slide, len(plan_), chunks, media)


@router.post(
    "/{slide_id}/predictions", response_class=StreamingResponse, responses={
        **STREAM_ERRORS,
        503: {"model": ErrorBody, "description": "The model worker is not ready"},
        200: {"content": binary_content("application/x-ndjson"),
              "description": "One record per patch, then a summary record"},
    },
)
async def predictions(
    slide_id: str, req: SamplingRequest, services: ServicesDep,
    embedding_format: Annotated[EmbeddingFormat, Query(
        description="Encoders: each record's embedding as base64 of little-endian float16 or "
        "float32 ({dtype, shape, data}), a JSON list, or none (the feature bag of a job "
        "holds all of them as features.h5).")] = "base64-float16",
) -> StreamingResponse:
    """Stream predictions as batches complete: one NDJSON record per patch (coordinates and
    outputs; an encoder's embedding under its output name), then ``{"type": "summary",
    ...}``. Patch size and MPP are the model's."""
    worker = services.require_worker()
    slide, plan_ = await services.stream_work(open_and_plan, services, slide_id, req, True)
    chunks = prediction_chunks(slide, slide_id, plan_, worker,
                               batch_size=services.settings.batch_size,
                               metrics=services.metrics, cancel=threading.Event(),
                               embedding_format=embedding_format)
    # Closing the stream (end, or client gone) closes this generator and its extractor.
    return slide_stream(services, slide, len(plan_), chunks, "application/x-ndjson")
