"""/viewer: the slide viewer page, its own files, and OpenSeadragon's from its npm package.

OpenSeadragon is installed by ``make viewer-assets`` (``npm ci`` in ``viewer/``, a pinned
version in its lock file) and served from there (``WSI_VIEWER_ASSETS`` to point elsewhere,
e.g. in an image); it is never copied into the repository nor loaded from a CDN. Without
the assets the page answers 503 saying how to install them. The page and its files need no
API key; everything it shows comes from ``/v1``, with the key the user types."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

from wsi_sampler.errors import SlideNotFoundError

from ..errors import ViewerAssetsMissingError

router = APIRouter(tags=["viewer"])
PAGE_DIR = Path(__file__).resolve().parents[1] / "viewer"
OWN_FILES = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
_DEFAULT_ASSETS = (Path(__file__).resolve().parents[2] / "viewer" / "node_modules"
                   / "openseadragon" / "build" / "openseadragon")
_TYPES = {".js": "text/javascript", ".map": "application/json", ".png": "image/png",
          ".svg": "image/svg+xml"}


def assets_dir() -> Path:
    return Path(os.environ.get("WSI_VIEWER_ASSETS") or _DEFAULT_ASSETS)


@router.get("/viewer", response_class=HTMLResponse,
            responses={503: {"description": "OpenSeadragon is not installed"}})
async def viewer_page() -> Response:
    """The viewer (``/viewer?slide={id}`` opens a slide directly)."""
    if not (assets_dir() / "openseadragon.min.js").is_file():
        raise ViewerAssetsMissingError(
            f"the viewer's OpenSeadragon files are not installed ({assets_dir()}): run "
            "`make viewer-assets` (npm ci in viewer/) or set WSI_VIEWER_ASSETS")
    return HTMLResponse((PAGE_DIR / "index.html").read_text(),
                        headers={"Cache-Control": "no-cache"})


@router.get("/viewer/static/{name}", include_in_schema=False)
async def viewer_file(name: str) -> Response:
    if name not in OWN_FILES:
        raise SlideNotFoundError(f"no viewer file {name!r}")
    return FileResponse(PAGE_DIR / name, media_type=OWN_FILES[name],
                        headers={"Cache-Control": "no-cache"})


@router.get("/viewer/osd/{path:path}", include_in_schema=False)
async def openseadragon_file(path: str) -> Response:
    root = assets_dir().resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file() \
            or target.suffix not in _TYPES:
        raise SlideNotFoundError(f"no OpenSeadragon file {path!r}")
    return FileResponse(target, media_type=_TYPES[target.suffix],
                        headers={"Cache-Control": "public, max-age=86400"})
