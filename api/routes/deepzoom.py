"""/v1/slides/{id}/deepzoom.dzi and its tiles, in the layout OpenSeadragon derives from a
``.dzi`` URL by itself (``deepzoom_files/{level}/{col}_{row}.{format}``, the query string
carried over). Defaults as openslide's ``DeepZoomGenerator``: 254 px tiles, 1 px overlap,
JPEG; the same parameters give its tiles (PNG pixel for pixel; JPEG within JPEG's own error,
as levels read at 2-8x the tile's resolution are decoded scaled). With ``overlap=0`` and the
slide's own tile size, native-level JPEG tiles go out as stored. ``v`` = the slide's fingerprint
(as the ``.dzi`` answer's ``ETag`` gives it) makes the URLs immutable for caches."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from wsi_sampler.errors import InvalidRequestError

from ..deps import ServicesDep
from ..schemas import ErrorBody, binary_content
from ..tiles import TileParams

router = APIRouter(prefix="/v1/slides", tags=["viewer"])
ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "Unknown slide id"},
    422: {"model": ErrorBody, "description": "Unsupported or corrupt slide, no such tile, "
                                             "or invalid parameters"},
    429: {"model": ErrorBody, "description": "Too many tiles of this client in flight"},
}
_TILE = re.compile(r"^(\d{1,6})_(\d{1,6})\.(jpeg|jpg|png)$")
_IMMUTABLE = "private, max-age=31536000, immutable"
_REVALIDATE = "private, no-cache"

TileSizeQ = Annotated[int, Query(ge=1, le=4096, description="Tile side in px")]
OverlapQ = Annotated[int, Query(ge=0, le=64, description="Extra px on each inner side")]
FormatQ = Annotated[Literal["jpeg", "png"], Query(alias="format")]
QualityQ = Annotated[int, Query(ge=1, le=100, description="JPEG quality")]
BoundsQ = Annotated[bool, Query(description="Only the slide's non-empty bounding box")]
VersionQ = Annotated[str | None, Query(alias="v", max_length=128,
                                       description="The slide's fingerprint (immutable URLs)")]


def _etag(fingerprint: str, params: TileParams, where: str) -> str:
    return f'"{fingerprint[:32]}-{params.tag()}-{where}"'


def _cache_headers(etag: str, fingerprint: str, version: str | None) -> dict[str, str]:
    immutable = version is not None and version == fingerprint
    return {"ETag": etag, "Cache-Control": _IMMUTABLE if immutable else _REVALIDATE}


@router.get("/{slide_id}/deepzoom.dzi", response_class=Response, responses={
    **ERRORS, 200: {"content": binary_content("application/xml"),
                    "description": "The DZI description (Deep Zoom Image XML)"}})
async def deepzoom_dzi(
    slide_id: str, services: ServicesDep, request: Request, tile_size: TileSizeQ = 254,
    overlap: OverlapQ = 1, image_format: FormatQ = "jpeg", quality: QualityQ = 90,
    limit_bounds: BoundsQ = False, version: VersionQ = None,
) -> Response:
    """The slide as a DeepZoom pyramid; its ``ETag`` is the slide's fingerprint."""
    params = TileParams(tile_size, overlap, image_format, quality, limit_bounds)

    text, fingerprint = await services.slide_work(services.tiles.dzi, slide_id, params)
    body = text.encode()
    headers = _cache_headers(_etag(fingerprint, params, "dzi"), fingerprint, version)
    headers["X-Slide-Fingerprint"] = fingerprint
    return Response(body, media_type="application/xml", headers=headers)


@router.get("/{slide_id}/deepzoom_files/{level}/{tile}", response_class=Response,
            responses={**ERRORS, 200: {"content": binary_content("image/jpeg", "image/png"),
                                       "description": "One DeepZoom tile"}})
async def deepzoom_tile(
    slide_id: str, level: int, tile: str, services: ServicesDep, request: Request,
    tile_size: TileSizeQ = 254, overlap: OverlapQ = 1, quality: QualityQ = 90,
    limit_bounds: BoundsQ = False, version: VersionQ = None,
) -> Response:
    """Tile ``{col}_{row}.{jpeg|png}`` of DeepZoom ``level`` (0 = 1 x 1 px)."""
    match = _TILE.match(tile)
    if match is None:
        raise InvalidRequestError(f"tile {tile!r} is not {{col}}_{{row}}.jpeg or .png")
    col, row, ext = int(match[1]), int(match[2]), match[3]
    fmt = "png" if ext == "png" else "jpeg"
    params = TileParams(tile_size, overlap, fmt, quality, limit_bounds)
    client = str(getattr(request.state, "owner", "")) or (
        request.client.host if request.client else "")
    warm = services.tiles.cached(slide_id, params, level, col, row)
    data, fingerprint = warm if warm is not None else await services.tiles.run(
        client, lambda: services.tiles.tile(slide_id, params, level, col, row))
    etag = _etag(fingerprint, params, f"{level}-{col}-{row}")
    headers = _cache_headers(etag, fingerprint, version)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=f"image/{fmt}", headers=headers)
