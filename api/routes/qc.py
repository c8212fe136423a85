"""/v1/slides/{id}/qc: the slide's quality-control summary (JSON) and its overlay (PNG),
as ``wsi-sampler qc`` gives them (:mod:`wsi_sampler.qc`)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from wsi_sampler.encoding import encode_image
from wsi_sampler.geojson import dumps
from wsi_sampler.plan import compute_tissue_mask
from wsi_sampler.qc import (
    QcMasks,
    draw_qc_overlay,
    qc_collection,
    qc_layer,
    qc_masks,
    slide_qc,
)
from wsi_sampler.slide import Slide
from wsi_sampler.types import TissueMethod
from wsi_sampler.units import SLIDE_MPP_RANGE, TISSUE_MPP_RANGE

from ..deps import Services, ServicesDep
from ..schemas import GEOJSON_CONTENT, TissueMethodQ, binary_content
from .slides import ERRORS

router = APIRouter(prefix="/v1/slides", tags=["slides"])

TissueMppQ = Annotated[float, Query(ge=TISSUE_MPP_RANGE[0], le=TISSUE_MPP_RANGE[1],
                                    description="Mask resolution in µm/px")]
MppOverrideQ = Annotated[float | None, Query(ge=SLIDE_MPP_RANGE[0], le=SLIDE_MPP_RANGE[1])]


class SlideQcReport(BaseModel):
    fingerprint: str
    mask_mpp: float
    slide_area_mm2: float
    tissue_area_mm2: float
    tissue_area_before_exclusion_mm2: float = Field(
        description="Tissue before artefact exclusion (pen ink and dark pixels, or the "
        "configured artefact model's classes)")
    excluded_mm2: dict[str, float] = Field(
        description="Removed by each excluded class (pen, dark; or fold, dark_spot, pen, "
        "air_bubble, out_of_focus with the artefact model)")
    excluded_share: float = Field(description="Share of the tissue the exclusion removed")
    pen_area_mm2: float
    dark_area_mm2: float
    sampled_patches: int
    patch_measures: dict[str, float] = Field(
        description="Medians of the tissue-qc measurements over the sampled patches")
    qc_labels: dict[str, float] = Field(description="Share of sampled patches per QC label")
    stain_vectors: dict[str, list[float]] | None = Field(
        description="Macenko's haematoxylin and eosin optical-density vectors (RGB)")
    warnings: list[str]
    artifact_mm2: dict[str, float] = Field(
        default_factory=dict, description="The artefact model's classes on the tissue, "
        "excluded or not (empty without artifact_weights in the service config)")
    artifact_detector: str = Field("classical", description="classical, or the artefact "
                                   "model's card name")
    overlay_legend: dict[str, str] = Field(
        default_factory=dict, description="What qc.png draws in which colour (#rrggbb), in "
        "drawing order: the area the exclusion removed, then the artefact model's classes or "
        "the classical ink and dark pixels")


def _qc_masks(services: Services, slide: Slide, tissue_mpp: float,
              tissue_method: TissueMethod | None) -> QcMasks:
    """What QC found on ``slide``, with the service's tissue settings (and the request's
    method): what the overlay, its layer and the QuPath annotations are drawn from."""
    tm = compute_tissue_mask(slide, tissue_mpp=tissue_mpp,
                             params=services.tissue_for(tissue_method))
    return qc_masks(slide, tm)


@router.get("/{slide_id}/qc", response_model=SlideQcReport, responses=ERRORS)
async def qc_summary(slide_id: str, services: ServicesDep, tissue_mpp: TissueMppQ = 8.0,
                     mpp_override: MppOverrideQ = None,
                     tissue_method: TissueMethodQ = None) -> SlideQcReport:
    """Tissue and artefact areas, patch blur/pen/dark/stain measures and stain vectors."""
    def measure() -> SlideQcReport:
        with services.registry.open(slide_id, mpp_override=mpp_override) as s:
            summary, _ = slide_qc(s, tissue_mpp=tissue_mpp,
                                  params=services.tissue_for(tissue_method))
        return SlideQcReport.model_validate(summary.to_dict())

    return await services.slide_work(measure)


@router.get("/{slide_id}/qc.png", response_class=Response, responses={
    **ERRORS, 200: {"content": binary_content("image/png"),
                    "description": "The QC overlay: tissue green, removed by the exclusion "
                                   "red; ink magenta and dark artefacts blue, or with the "
                                   "artefact model fold orange, dark spot blue, pen "
                                   "magenta, air bubble cyan, out of focus yellow "
                                   "(background=none: the classes alone, RGBA, transparent "
                                   "elsewhere, at the mask's resolution)"}})
async def qc_overlay(
    slide_id: str, services: ServicesDep, tissue_mpp: TissueMppQ = 8.0,
    mpp_override: MppOverrideQ = None, tissue_method: TissueMethodQ = None,
    max_size: Annotated[int, Query(ge=64, le=4096)] = 1024,
    background: Annotated[Literal["thumbnail", "none"], Query(
        description="thumbnail: drawn on the slide's thumbnail (max_size); none: a layer to "
        "draw over the slide (the /qc summary's overlay_legend names its colours)")
    ] = "thumbnail",
) -> Response:
    """The thumbnail with what QC found drawn on it, or that drawing alone."""
    def draw() -> bytes:
        with services.registry.open(slide_id, mpp_override=mpp_override) as s:
            masks = _qc_masks(services, s, tissue_mpp, tissue_method)
            if background == "none":
                return encode_image(qc_layer(masks))
            return encode_image(draw_qc_overlay(s.thumbnail(max_size=max_size), masks))

    return Response(await services.slide_work(draw), media_type="image/png")


@router.get("/{slide_id}/qc.geojson", response_class=Response, responses={
    **ERRORS, 200: {"content": GEOJSON_CONTENT, "description": (
        "What QC found as QuPath annotations (level-0 px): the tissue after exclusion, then "
        "each class qc.png draws, classified, in its colour, with its area ('Area mm2')")}})
async def qc_geojson(
    slide_id: str, services: ServicesDep, tissue_mpp: TissueMppQ = 8.0,
    mpp_override: MppOverrideQ = None, tissue_method: TissueMethodQ = None,
) -> Response:
    """The QC classes as polygons QuPath imports (File > Import objects)."""
    def vectorise() -> str:
        with services.registry.open(slide_id, mpp_override=mpp_override) as s:
            return dumps(qc_collection(_qc_masks(services, s, tissue_mpp, tissue_method)))

    return Response(await services.slide_work(vectorise), media_type="application/geo+json")
