"""/v1/slides: list, upload, info, thumbnail, tissue."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from wsi_sampler import compute_tissue_mask
from wsi_sampler._io import disk_full_is_an_error, require_free_space
from wsi_sampler.encoding import encode_image
from wsi_sampler.export import tissue_collection
from wsi_sampler.geojson import dumps
from wsi_sampler.units import SLIDE_MPP_RANGE, TISSUE_MPP_RANGE

from ..deps import ServicesDep
from ..schemas import (
    GEOJSON_CONTENT,
    ErrorBody,
    RootError,
    SlideInfo,
    SlideList,
    SlideSummary,
    TissueMethodQ,
    binary_content,
)
from ..slides import SlideEntry, root_source
from ..uploads import receive_upload, store_upload, temp_upload_path

router = APIRouter(prefix="/v1/slides", tags=["slides"])
ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "Unknown slide id"},
    422: {"model": ErrorBody, "description": "Unsupported or corrupt slide, missing MPP, "
                                             "or invalid parameters"},
}
_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


def _summary(e: SlideEntry, uploads: Path | None) -> SlideSummary:
    """The entry as listed (``uploads``: the registry's upload root)."""
    return SlideSummary(id=e.id, name=e.name, path=e.relpath, format=e.format,
                        size_bytes=e.size_bytes, source=e.source,
                        uploaded=e.local_root is not None and e.local_root == uploads)


@router.get("", response_model=SlideList)
async def list_slides(
    services: ServicesDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> SlideList:
    """Slides under the configured roots, paginated, in path order."""
    entries = await run_in_threadpool(services.registry.listing)
    page = entries[offset : offset + limit]
    failed = [RootError(source=root_source(root),
                        root=services.registry.remote_roots.index(root),
                        error=services.scrub(message))
              for root, message in services.registry.root_errors().items()]
    uploads = services.registry.uploads
    return SlideList(items=[_summary(e, uploads) for e in page], total=len(entries),
                     offset=offset, limit=limit, unavailable_roots=failed)


@router.post("", status_code=201, response_model=SlideSummary, openapi_extra={
                 "requestBody": _UPLOAD_BODY},
             responses={413: {"model": ErrorBody, "description": "Upload too large"},
                        422: ERRORS[422],
                        507: {"model": ErrorBody, "description": "Not enough free disk space "
                              "on the server for the upload"}})
async def upload_slide(request: Request, services: ServicesDep) -> SlideSummary:
    """Upload a slide: multipart field ``file``, or the raw bytes as
    ``application/octet-stream``. Its format is sniffed from its content, and the same
    bytes uploaded twice are stored once (same id)."""
    uploads = services.settings.uploads_dir
    declared = request.headers.get("content-length", "")
    if declared.isdigit():  # what will not fit is refused before a byte is read
        require_free_space(uploads, int(declared) + _UPLOAD_HEADROOM, "this upload")
    with disk_full_is_an_error("the upload"):
        tmp = await run_in_threadpool(temp_upload_path, uploads)
        try:
            received = await receive_upload(request, tmp)
            entry = await services.slide_work(store_upload, services.registry, uploads,
                                              received)
        finally:
            tmp.unlink(missing_ok=True)  # what arrived of an upload that failed is dropped
    return _summary(entry, services.registry.uploads)


_UPLOAD_HEADROOM = 16 << 20  # the disk is not filled to the last byte by one upload


@router.delete("/{slide_id}", status_code=204, response_class=Response, responses={
    404: ERRORS[404], 405: {"model": ErrorBody, "description": "Not an upload: slides in "
                            "configured roots and on servers are managed where they are"}})
async def delete_slide(slide_id: str, services: ServicesDep) -> Response:
    """Delete an uploaded slide (its file and name). Slides of the configured roots and
    servers are never deleted over the API (405, saying why)."""
    await run_in_threadpool(services.registry.delete_upload, slide_id)
    return Response(status_code=204)


@router.get("/{slide_id}", response_model=SlideInfo, responses=ERRORS)
async def slide_info(slide_id: str, services: ServicesDep) -> SlideInfo:
    """Size, levels, MPP, objective, vendor and fingerprint of a slide."""
    def read() -> SlideInfo:
        entry = services.registry.get(slide_id)
        with services.registry.open(slide_id) as s:
            info = s.info()
        info.pop("path")
        return SlideInfo.model_validate(
            info | {"id": slide_id, "name": entry.name, "format": entry.format}
        )

    return await run_in_threadpool(read)


@router.get("/{slide_id}/thumbnail", response_class=Response, responses={
    **ERRORS, 200: {"content": binary_content("image/png", "image/jpeg"),
                    "description": "The thumbnail image"}})
async def thumbnail(
    slide_id: str, services: ServicesDep,
    max_size: Annotated[int, Query(ge=16, le=4096)] = 1024,
    image_format: Annotated[Literal["png", "jpeg"], Query(alias="format")] = "png",
) -> Response:
    """The whole slide fitted within ``max_size`` px."""
    def render() -> bytes:
        with services.registry.open(slide_id) as s:
            return encode_image(s.thumbnail(max_size=max_size), f".{image_format}")

    body = await services.slide_work(render)
    return Response(body, media_type=f"image/{image_format}")


@router.get("/{slide_id}/tissue", response_model=None,
            responses={**ERRORS, 200: {
                "content": binary_content("image/png") | GEOJSON_CONTENT,
                "description": "The tissue mask (PNG) or its polygons (GeoJSON, level-0 px)"}})
async def tissue(
    slide_id: str, services: ServicesDep,
    output: Annotated[Literal["png", "geojson"], Query(alias="format")] = "png",
    tissue_mpp: Annotated[float, Query(ge=TISSUE_MPP_RANGE[0], le=TISSUE_MPP_RANGE[1])] = 8.0,
    mpp_override: Annotated[float | None, Query(ge=SLIDE_MPP_RANGE[0],
                                                le=SLIDE_MPP_RANGE[1])] = None,
    tissue_method: TissueMethodQ = None,
) -> Response:
    """The tissue mask as a PNG (white = tissue) or QuPath GeoJSON polygons (level-0 px):
    what plans sample from, with the service's tissue method and artefact exclusion."""
    def detect() -> Response:
        with services.registry.open(slide_id, mpp_override=mpp_override) as s:
            tm = compute_tissue_mask(s, tissue_mpp=tissue_mpp,
                                     params=services.tissue_for(tissue_method))
        if output == "png":
            return Response(encode_image(tm.mask.astype("uint8") * 255),
                            media_type="image/png")
        return Response(dumps(tissue_collection(tm.mask, tm.scale)),
                        media_type="application/geo+json")

    return await services.slide_work(detect)

