"""/v1/slides/{id}/reports: a slide's MedGemma bag described by a vision-language model,
streamed as NDJSON (bag, text deltas, report)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from wsi_sampler import PatchPlan, Slide
from wsi_sampler.report import prepare_bag
from wsi_sampler.worker.vlm import VlmWorker

from ..deps import Services, ServicesDep
from ..report_stream import report_chunks
from ..schemas import ErrorBody, ReportRequest, binary_content
from ..streaming import NDJSON, slide_stream

router = APIRouter(prefix="/v1/slides", tags=["reports"])


def _open_bag(services: Services, slide_id: str, req: ReportRequest, vlm: VlmWorker
              ) -> tuple[Slide, PatchPlan]:
    slide = services.registry.open(slide_id, mpp_override=req.mpp_override)
    try:
        return slide, prepare_bag(slide, req.to_params(services.tissue_params), vlm,
                                  req.prompt)
    except BaseException:
        slide.close()
        raise


@router.post("/{slide_id}/reports", response_class=StreamingResponse, responses={
    404: {"model": ErrorBody, "description": "Unknown slide id"},
    422: {"model": ErrorBody, "description": "Corrupt slide, missing MPP, a slide without "
                                             "tissue, or a bag the model cannot take"},
    429: {"model": ErrorBody, "description": "Too many concurrent streams (see Retry-After)"},
    502: {"model": ErrorBody, "description": "The vision-language model failed"},
    503: {"model": ErrorBody, "description": "No model configured, or it cannot be reached"},
    200: {"content": binary_content(NDJSON),
          "description": 'NDJSON: {"type": "bag"}, {"type": "delta", "text"}..., then '
                         '{"type": "report", "text", "usage", "timings_s"}'},
})
async def reports(slide_id: str, req: ReportRequest, services: ServicesDep
                  ) -> StreamingResponse:
    """Send the slide's MedGemma bag (one user message: the prompt, then the patches as
    data URIs, in bag order) to the configured vision-language model and stream its answer.
    """
    vlm = services.vlm_for(req)
    try:
        slide, plan = await services.stream_work(_open_bag, services, slide_id, req, vlm)
    except BaseException:
        vlm.close()
        raise
    chunks = report_chunks(slide, plan, vlm, req.prompt)
    return slide_stream(services, slide, len(plan), chunks, NDJSON, also_close=vlm.close,
                        interrupt=vlm.cancel)
