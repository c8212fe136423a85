"""Whole-slide images behind one interface, whatever the backend.

Frame: every coordinate taken or returned here is a level-0 pixel (``x0``, ``y0``);
sizes are level-0 pixels unless a name says otherwise (``*_level`` or ``out_*``).
Images are (H, W, 3) uint8 RGB numpy arrays; areas outside the scanned image are white.

Thread safety: ``read_region`` and everything built on it may be called from several
threads at once. openslide is thread-safe itself; tiffslide reads are serialised by a lock.
"""

from __future__ import annotations

import math
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from ._backends import Reader, open_reader
from ._tiles import TileSource, default_threads, resize_area
from .errors import (
    CorruptSlideError,
    InvalidRequestError,
    MissingMppError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from .sources.location import parse_location

if TYPE_CHECKING:
    from .sources.dicomweb import DicomWebCredentials
from .sources.origin import LocalOrigin, SlideOrigin
from .types import Backend, BackendChoice, RGBImage
from .units import SLIDE_MPP_RANGE, check_mpp

__all__ = ["Slide", "open_slide"]

# No scanner makes a side longer than this (a 75 mm slide at 0.1 µm/px is 750,000 px).
_MAX_SIDE_PX = 2_000_000
# Output rows resampled per read when building thumbnails; bounds memory on huge levels.
_THUMB_BAND_PX = 512
# Source pixels decoded per thumbnail band (memory) and per thumbnail (time, ~5 s here):
# a slide without a pyramid level near the asked resolution is refused, not read for
# minutes. Stored tiles decode in parallel (~200 Mpx/s on 2 cores); openslide's
# read_region of an unpyramided level manages ~12-40 Mpx/s.
_THUMB_BAND_SOURCE_PX = 32 << 20
_THUMB_SOURCE_PX_TILES = 1 << 30
_THUMB_SOURCE_PX_BACKEND = 1 << 26


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise SlideNotFoundError(f"{path}: no such slide file or folder") from None
    except OSError as exc:  # a symlink loop, a name too long, no permission
        raise SlideNotFoundError(f"{path}: cannot be opened ({exc.strerror or exc})") from None


def _require_regular(path: Path, st: os.stat_result) -> None:
    # A FIFO, socket or device would block or stream forever when read: never open one.
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFormatError(
            f"{path}: not a regular file (FIFOs, sockets and devices are never opened)"
        )


def _resolve_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    st = _stat(p)
    if stat.S_ISDIR(st.st_mode):
        # A DICOM-WSI series is a folder; openslide opens it through any of its files and
        # reads the others too, so every one of them must be a regular file.
        dcm = sorted(p.glob("*.dcm"))
        if not dcm:
            raise SlideNotFoundError(f"{p}: a folder, and it holds no DICOM (.dcm) slide")
        for child in sorted(p.iterdir()):
            child_st = _stat(child)
            if not stat.S_ISDIR(child_st.st_mode):
                _require_regular(child, child_st)
        return dcm[0]
    _require_regular(p, st)
    if st.st_size == 0:
        raise CorruptSlideError(f"{p}: the file is empty (zero bytes)")
    return p


def _mpp_from_resolution(res: tuple[float, float, str] | None) -> tuple[float, float] | None:
    if res is None:
        return None
    xres, yres, unit = res
    per_unit_um = {"centimeter": 1e4, "inch": 25_400.0, "millimeter": 1e3}.get(unit.lower())
    if per_unit_um is None or xres <= 0 or yres <= 0:
        return None
    mpp = (per_unit_um / xres, per_unit_um / yres)
    return mpp if all(_plausible_mpp(m) for m in mpp) else None


def _plausible_mpp(mpp: float) -> bool:
    # Values outside the physical range are placeholders (72 dpi, 1 px/unit) or damage.
    lo, hi = SLIDE_MPP_RANGE
    return math.isfinite(mpp) and lo <= mpp <= hi


def _float_prop(props: dict[str, str], *keys: str) -> float | None:
    for key in keys:
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


def _check_geometry(path: str, reader: Reader) -> None:
    """Refuse level sizes and downsamples no real slide has (they would break every read)."""
    dims, downsamples = reader.level_dimensions, reader.level_downsamples
    if not dims or len(dims) != len(downsamples) or dims[0] != reader.dimensions:
        raise CorruptSlideError(f"{path}: inconsistent pyramid levels")
    for (w, h), ds in zip(dims, downsamples, strict=True):
        if not (0 < w <= _MAX_SIDE_PX and 0 < h <= _MAX_SIDE_PX):
            raise CorruptSlideError(f"{path}: absurd slide dimensions {w}x{h}")
        if not (math.isfinite(ds) and 0.5 <= ds <= _MAX_SIDE_PX):
            raise CorruptSlideError(f"{path}: absurd level downsample {ds}")


class Slide:
    """An open whole-slide image. Use :func:`open_slide` to get one."""

    def __init__(
        self, origin: SlideOrigin, reader: Reader, *, mpp_override: float | None = None
    ) -> None:
        self._origin = origin
        self.path: Path | None = origin.path
        """The local file, or None for a slide on a server (see ``location``)."""
        self.location = origin.location
        """The local path or the URL the slide was opened from."""
        self.name = origin.name
        """The file name (a DICOMweb series: its series UID)."""
        self._reader = reader
        try:
            _check_geometry(self.location, reader)
        except CorruptSlideError:
            reader.close()
            origin.close()
            raise
        props = dict(reader.properties)
        self.properties: dict[str, str] = props
        prefix = reader.backend
        if mpp_override is not None:
            self.mpp: tuple[float, float] | None = (mpp_override, mpp_override)
        else:
            mx = _float_prop(props, f"{prefix}.mpp-x")
            my = _float_prop(props, f"{prefix}.mpp-y")
            self.mpp = (mx, my) if mx and my and _plausible_mpp(mx) and _plausible_mpp(my) \
                else _mpp_from_resolution(reader.tiff_resolution())
        self.objective_power = _float_prop(props, f"{prefix}.objective-power")
        vendor = props.get(f"{prefix}.vendor")
        self.vendor: str | None = vendor if vendor and vendor != "None" else None
        self._fingerprint: str | None = None
        self._tiles: TileSource | None = None
        self._tiles_probed = False
        self._tiles_lock = threading.Lock()
        self._closed = False

    # -- geometry ---------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        return self._reader.backend

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._reader.dimensions

    @property
    def level_count(self) -> int:
        return len(self._reader.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._reader.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._reader.level_downsamples

    @property
    def associated_image_names(self) -> tuple[str, ...]:
        return self._reader.associated_names

    def require_mpp(self) -> tuple[float, float]:
        """Return level-0 (mpp_x, mpp_y) in µm/px, or raise :class:`MissingMppError`."""
        if self.mpp is None:
            raise MissingMppError(self.location)
        return self.mpp

    def best_level_for_downsample(self, downsample: float) -> int:
        """Return the coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = level
        return best

    # -- pixels -----------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> RGBImage:
        """Read ``size`` (w, h) pixels of ``level`` whose top-left is level-0 ``location``."""
        if not 0 <= level < self.level_count:
            raise InvalidRequestError(f"level {level} does not exist (0..{self.level_count - 1})")
        width, height = size
        if width <= 0 or height <= 0 or width * height > 1 << 28:
            raise InvalidRequestError(f"region size {width}x{height} is not readable")
        x0, y0 = location
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # Clip to the level so every backend pads outside the image the same way: white.
        lx, ly = math.floor(x0 / ds), math.floor(y0 / ds)
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + width, lw), min(ly + height, lh)
        if cx0 == lx and cy0 == ly and cx1 == lx + width and cy1 == ly + height:
            return self._reader.read(x0, y0, level, width, height)
        out = np.full((height, width, 3), 255, np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            inner = self._reader.read(
                x0 + round((cx0 - lx) * ds), y0 + round((cy0 - ly) * ds), level,
                cx1 - cx0, cy1 - cy0,
            )
            out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = inner
        return out

    def read_scaled(
        self, x0: int, y0: int, width0: int, height0: int, out_size: tuple[int, int]
    ) -> RGBImage:
        """Read a level-0 box and resample it to ``out_size`` (w, h) with antialiasing.

        Reads from the coarsest pyramid level that still has at least the output resolution.
        """
        out_w, out_h = out_size
        downsample = min(width0 / out_w, height0 / out_h)
        level = self.best_level_for_downsample(downsample)
        ds = self.level_downsamples[level]
        lw, lh = max(1, round(width0 / ds)), max(1, round(height0 / ds))
        return resize_area(self.read_region((x0, y0), level, (lw, lh)), (out_w, out_h))

    def thumbnail(self, *, mpp: float | None = None, max_size: int | None = None) -> RGBImage:
        """Return the whole slide at ``mpp`` µm/px, or fitted within ``max_size`` pixels.

        Reads only the pyramid level closest to the requested resolution, in bands, so
        memory is bounded by the output size, not the slide size.
        """
        if (mpp is None) == (max_size is None):
            raise InvalidRequestError("thumbnail needs exactly one of mpp or max_size")
        w, h = self.dimensions
        if mpp is not None:
            if not (math.isfinite(mpp) and mpp > 0):
                raise InvalidRequestError(f"thumbnail mpp must be > 0, got {mpp}")
            mx, my = self.require_mpp()
            out_w, out_h = max(1, round(w * mx / mpp)), max(1, round(h * my / mpp))
        else:
            assert max_size is not None
            if max_size <= 0:
                raise InvalidRequestError(f"max_size must be > 0, got {max_size}")
            scale = max_size / max(w, h)
            out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
        if out_w * out_h > 1 << 28:
            raise InvalidRequestError(f"thumbnail of {out_w}x{out_h} px is too large")
        return self._banded_resample(out_w, out_h)

    def _banded_resample(self, out_w: int, out_h: int) -> RGBImage:
        w, h = self.dimensions
        fy = h / out_h
        level = self.best_level_for_downsample(min(w / out_w, h / out_h))
        lw, lh = self.level_dimensions[level]
        source = self.tile_source()
        tiled = source is not None and level in source.levels
        limit = _THUMB_SOURCE_PX_TILES if tiled else _THUMB_SOURCE_PX_BACKEND
        if lw * lh > limit:
            raise InvalidRequestError(
                f"{self.location}: no pyramid level close to the asked resolution; a "
                f"{out_w}x{out_h} px image would decode {lw * lh / 1e6:,.0f} Mpx of level "
                f"{level} (limit {limit / 1e6:,.0f} Mpx)"
            )
        # Output rows per band, so that one band decodes at most _THUMB_BAND_SOURCE_PX.
        band_px = max(1, min(_THUMB_BAND_PX, _THUMB_BAND_SOURCE_PX * out_h // (lw * lh)))
        ds = self.level_downsamples[level]
        out = np.empty((out_h, out_w, 3), np.uint8)
        with ThreadPoolExecutor(default_threads() if tiled else 1) as pool:
            for oy in range(0, out_h, band_px):
                oh = min(band_px, out_h - oy)
                y0, y1 = round(oy * fy), round((oy + oh) * fy)
                if source is not None and tiled:
                    box = (0, math.floor(y0 / ds), max(1, round(w / ds)),
                           max(1, round((y1 - y0) / ds)))
                    band = source.read_scaled(level, box, (out_w, oh), pool)
                else:
                    band = self.read_scaled(0, y0, w, max(1, y1 - y0), (out_w, oh))
                out[oy : oy + oh] = band
        return out

    def associated_image(self, name: str) -> RGBImage:
        """Return an associated image (``thumbnail``, ``label``, ``macro``...) as RGB."""
        if name not in self.associated_image_names:
            raise InvalidRequestError(
                f"{self.location}: no associated image {name!r} "
                f"(available: {', '.join(self.associated_image_names) or 'none'})"
            )
        return self._reader.associated(name)

    def tile_source(self) -> TileSource | None:
        """Direct access to the stored tiles, or None where only the backend can read."""
        with self._tiles_lock:
            if not self._tiles_probed:
                self._tiles_probed = True
                self._tiles = self._origin.open_tiles(self.level_dimensions)
            return self._tiles

    # -- identity ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` over the file size and its first MiB (the same for a file read
        locally or over HTTP/S3); a DICOMweb series: over its study, series and instance
        UIDs."""
        if self._fingerprint is None:
            self._fingerprint = self._origin.fingerprint()
        return self._fingerprint

    @property
    def stem(self) -> str:
        """The name without its extension (CLAM/TRIDENT use it as the slide id)."""
        # A DICOM series is named by its UID, whose dots are not an extension.
        return self.name if self.backend == "wsidicom" else Path(self.name).stem

    def io_stats(self) -> dict[str, int] | None:
        """Requests made and bytes fetched so far (a remote slide), or None (a local one)."""
        return self._origin.io_stats()

    def info(self) -> dict[str, object]:
        """A JSON-ready summary of the slide."""
        return {
            "path": self.location,
            "backend": self.backend,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp_x": self.mpp[0] if self.mpp else None,
            "mpp_y": self.mpp[1] if self.mpp else None,
            "objective_power": self.objective_power,
            "associated_images": list(self.associated_image_names),
            "fingerprint": self.fingerprint,
        }

    def pseudonymise(self, name: str, location: str | None = None) -> None:
        """Name the slide ``name`` (and its location ``location``, default the name)
        wherever it names itself: messages, :meth:`info`, every output file. For a service
        that never shows its own paths, and de-identified mode, where a file name may
        carry a patient's name."""
        self.name = name
        self.location = location or name

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file handles; closing twice is harmless."""
        with self._tiles_lock:
            if self._closed:
                return
            self._closed = True
            if self._tiles is not None:
                self._tiles.close()
                self._tiles = None
            self._tiles_probed = True
        self._reader.close()
        self._origin.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.location!r}, backend={self.backend!r}, {w}x{h}, mpp={self.mpp})"


def open_slide(
    location: str | os.PathLike[str],
    *,
    backend: BackendChoice = "auto",
    mpp_override: float | None = None,
    dicomweb_credentials: DicomWebCredentials | None = None,
) -> Slide:
    """Open a whole-slide image from a local path or a URL (see
    :mod:`wsi_sampler.sources.location`: ``https://``, ``s3://``, ``dicomweb://``).

    ``backend="auto"`` tries openslide first and falls back to tiffslide for TIFFs
    openslide refuses (plain or generic TIFF, QPTIFF). A DICOM-WSI folder or any of its
    files opens through openslide. Remote TIFF-based slides open with tiffslide, DICOMweb
    series with wsidicom. ``mpp_override`` (µm/px) replaces the slide's own MPP.
    ``dicomweb_credentials`` default to the ``WSI_DICOMWEB_*`` environment.
    """
    if backend not in ("auto", "openslide", "tiffslide"):
        raise InvalidRequestError(f"unknown backend {backend!r} (auto, openslide, tiffslide)")
    if mpp_override is not None:
        check_mpp("mpp_override", mpp_override, SLIDE_MPP_RANGE)
    where = parse_location(location)
    origin: SlideOrigin
    if where.kind == "file":
        resolved = _resolve_path(where.url)
        reader = open_reader(resolved, backend)
        origin = LocalOrigin(resolved)
    elif backend == "openslide":
        raise InvalidRequestError(
            f"{where.url}: openslide reads local files only; use backend 'auto'")
    elif where.kind == "dicomweb":
        from .sources.dicomweb import open_dicomweb

        origin, reader = open_dicomweb(where, dicomweb_credentials)
    else:
        from .sources.remote_tiff import open_remote_tiff

        origin, reader = open_remote_tiff(where)
    return Slide(origin, reader, mpp_override=mpp_override)
