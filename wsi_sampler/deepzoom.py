"""DeepZoom tiles of a slide, laid out as openslide's ``DeepZoomGenerator`` lays them out.

A DeepZoom pyramid halves the level-0 size (rounding up) down to 1 x 1 px; its levels are
numbered from that 1 x 1 level (0) up to full resolution. Each level is cut into
``tile_size`` px tiles, each with ``overlap`` extra px on every side that has a neighbour.
A tile is read from the coarsest slide level whose downsample does not exceed the DeepZoom
level's, then shrunk to its DeepZoom size with Pillow's ``thumbnail`` (Lanczos), exactly as
``DeepZoomGenerator.get_tile`` does: the same parameters give the same pixels (the tests
compare with openslide's own generator). ``limit_bounds`` keeps only the slide's non-empty
bounding box (``openslide.bounds-*`` properties) where the slide gives one. The arithmetic
follows the DeepZoom format (Microsoft's Deep Zoom file format: ``<Image TileSize Overlap
Format><Size Width Height/></Image>``, tiles at ``{name}_files/{level}/{col}_{row}.{format}``)
and openslide-python's documented ``DeepZoomGenerator`` behaviour; it is written here.

Where the slide's stored tiles can be read directly (:meth:`Slide.tile_source`), they are
decoded with libjpeg-turbo and kept in :class:`DecodedTiles`, shared by the DeepZoom tiles
that overlap them, instead of going through the backend's ``read_region``: the same pixels,
about twice as fast. ``dct_scaling`` (for JPEG tiles, which are lossy anyway) also decodes a
level read at 2, 4 or 8 times the tile's resolution straight at the smaller size (libjpeg's
scaled inverse DCT, as the extractor does) before the Lanczos step: a fraction of the
decoding and resampling; the pixels stay well within JPEG's own error of the generator's
(tests/test_deepzoom.py measures both on the same tiles).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from ._tiles import TileLevel
from .errors import InvalidRequestError
from .slide import Slide
from .types import RGBImage

__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TILE_SIZE", "DecodedTiles", "DeepZoom", "TileRead",
           "dzi_xml", "thumbnail_size"]

DEFAULT_TILE_SIZE = 254
DEFAULT_OVERLAP = 1
DEFAULT_DECODED_MB = 16.0
_MIN_SCALED_PX = 16
_DZI_NS = "http://schemas.microsoft.com/deepzoom/2008"


@dataclass(frozen=True)
class TileRead:
    """Where a DeepZoom tile's pixels come from and the size it is shown at."""

    l0_location: tuple[int, int]
    slide_level: int
    level_size: tuple[int, int]
    """Pixels read from ``slide_level``."""
    size: tuple[int, int]
    """The tile's (w, h) in its DeepZoom level (``level_size`` shrunk to it if larger)."""


class DecodedTiles:
    """Decoded stored tiles, kept for the DeepZoom tiles that overlap them: a thread-safe LRU
    bounded in bytes (``budget_mb``); a tile two threads want at once is decoded once."""

    def __init__(self, budget_mb: float = DEFAULT_DECODED_MB) -> None:
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self._items: OrderedDict[Hashable, Future[RGBImage]] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable, load: Callable[[], RGBImage]) -> RGBImage:
        with self._lock:
            fut = self._items.get(key)
            owner = fut is None
            if fut is None:
                fut = self._items[key] = Future()
            else:
                self._items.move_to_end(key)
        if not owner:
            return fut.result()
        try:
            tile = load()
        except BaseException as exc:
            fut.set_exception(exc)
            with self._lock:
                if self._items.get(key) is fut:
                    del self._items[key]
            raise
        fut.set_result(tile)
        self._account(key, fut, tile.nbytes)
        return tile

    def _account(self, key: Hashable, fut: Future[RGBImage], nbytes: int) -> None:
        with self._lock:
            if self._items.get(key) is not fut:
                return  # cleared meanwhile
            self._sizes[key] = nbytes
            self.used += nbytes
            while self.used > self.budget and self._sizes:
                oldest = next(k for k in self._items if k in self._sizes)
                del self._items[oldest]
                self.used -= self._sizes.pop(oldest)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.used = 0


def thumbnail_size(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The size Pillow's ``Image.thumbnail(box)`` gives an image of ``size``: unchanged where
    it fits, else the aspect ratio kept, each side rounded down or up, whichever keeps the
    ratio closer (at least 1 px)."""
    (w, h), (x, y) = size, box
    if x >= w and y >= h:
        return size
    aspect = w / h

    def closest(value: float, error: Callable[[int], float]) -> int:
        return max(min(math.floor(value), math.ceil(value), key=error), 1)

    if x / y >= aspect:
        return closest(y * aspect, lambda n: abs(aspect - n / y)), y
    return x, closest(x / aspect, lambda n: 0 if n == 0 else abs(aspect - x / n))


class DeepZoom:
    """The DeepZoom geometry of ``slide`` (no pixels are read until :meth:`tile`).

    ``decoded`` keeps decoded stored tiles between calls (a service shares one over all its
    slides, keyed by fingerprint); by default each pyramid has its own, 16 MiB."""

    def __init__(self, slide: Slide, *, tile_size: int = DEFAULT_TILE_SIZE,
                 overlap: int = DEFAULT_OVERLAP, limit_bounds: bool = False,
                 decoded: DecodedTiles | None = None) -> None:
        if not 1 <= tile_size <= 4096:
            raise InvalidRequestError(f"tile_size {tile_size} is outside 1..4096")
        if not 0 <= overlap <= tile_size // 2:
            raise InvalidRequestError(f"overlap {overlap} is outside 0..{tile_size // 2}")
        self.slide = slide
        self.tile_size, self.overlap, self.limit_bounds = tile_size, overlap, limit_bounds
        self.decoded = decoded if decoded is not None else DecodedTiles()
        w0, h0 = slide.dimensions
        self._l0_offset = (0, 0)
        self._l_dims = slide.level_dimensions
        bounds = self._bounds() if limit_bounds else None
        if bounds is not None:
            bx, by, bw, bh = bounds
            self._l0_offset = (bx, by)
            scale = (bw / w0, bh / h0)
            self._l_dims = tuple((math.ceil(lw * scale[0]), math.ceil(lh * scale[1]))
                                 for lw, lh in slide.level_dimensions)

    def _bounds(self) -> tuple[int, int, int, int] | None:
        props = self.slide.properties
        for prefix in dict.fromkeys(("openslide", self.slide.backend)):
            try:
                values = [int(props[f"{prefix}.bounds-{k}"])
                          for k in ("x", "y", "width", "height")]
                break
            except (KeyError, ValueError):
                continue
        else:
            return None
        return (values[0], values[1], values[2], values[3]) if values[2] > 0 < values[3] \
            else None

    @cached_property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(w, h) of every DeepZoom level, 0 = 1 x 1 px."""
        size = self._l_dims[0]
        dims = [size]
        while size[0] > 1 or size[1] > 1:
            size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
            dims.append(size)
        return tuple(reversed(dims))

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @cached_property
    def level_tiles(self) -> tuple[tuple[int, int], ...]:
        """(columns, rows) of tiles at every DeepZoom level."""
        return tuple((math.ceil(w / self.tile_size), math.ceil(h / self.tile_size))
                     for w, h in self.level_dimensions)

    def _slide_level(self, dz_level: int) -> tuple[int, float]:
        """The slide level a DeepZoom level reads, and DeepZoom px per px of it."""
        l0_per_dz = 2.0 ** (self.level_count - dz_level - 1)
        downsamples = self.slide.level_downsamples
        level = max((i for i, ds in enumerate(downsamples) if ds <= l0_per_dz), default=0)
        return level, l0_per_dz / downsamples[level]

    def tile_read(self, dz_level: int, col: int, row: int) -> TileRead:
        """Where tile (col, row) of ``dz_level`` is read from; InvalidRequestError if no such
        tile exists."""
        if not 0 <= dz_level < self.level_count:
            raise InvalidRequestError(
                f"DeepZoom level {dz_level} does not exist (0..{self.level_count - 1})")
        cols, rows = self.level_tiles[dz_level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise InvalidRequestError(
                f"tile {col}_{row} does not exist at level {dz_level} ({cols} x {rows} tiles)")
        level, l_per_z = self._slide_level(dz_level)
        ts, ov = self.tile_size, self.overlap
        at, lims = (col, row), (cols, rows)
        before = [ov * int(t != 0) for t in at]
        after = [ov * int(t != lim - 1) for t, lim in zip(at, lims, strict=True)]
        z_size = [min(ts, z_lim - ts * t) + b + a for t, z_lim, b, a in
                  zip(at, self.level_dimensions[dz_level], before, after, strict=True)]
        l_loc = [l_per_z * (ts * t - b) for t, b in zip(at, before, strict=True)]
        ds = self.slide.level_downsamples[level]
        l0 = [int(v * ds + off) for v, off in zip(l_loc, self._l0_offset, strict=True)]
        l_size = [int(min(math.ceil(l_per_z * dz), l_lim - math.ceil(v)))
                  for v, dz, l_lim in zip(l_loc, z_size, self._l_dims[level], strict=True)]
        return TileRead((l0[0], l0[1]), level, (l_size[0], l_size[1]),
                        (z_size[0], z_size[1]))

    def tile(self, dz_level: int, col: int, row: int, *, dct_scaling: bool = False
             ) -> RGBImage:
        """Tile (col, row) of ``dz_level`` as (h, w, 3) uint8 RGB: the generator's pixels, or
        with ``dct_scaling`` within JPEG's error of them (see the module's docstring)."""
        where = self.tile_read(dz_level, col, row)
        scaled = self._read_stored(where, dct_scaling)
        if scaled is not None:
            pixels, scale = scaled
        else:
            pixels, scale = self.slide.read_region(where.l0_location, where.slide_level,
                                                   where.level_size), 1
        if scale == 1:
            if pixels.shape[1::-1] == where.size:
                return pixels
            image = Image.fromarray(pixels)
            image.thumbnail(where.size, Image.Resampling.LANCZOS)
            return np.asarray(image)
        # the size the generator's thumbnail of the whole read has
        target = thumbnail_size(where.level_size, where.size)
        if pixels.shape[1::-1] == target:
            return pixels
        resized = Image.fromarray(pixels).resize(target, Image.Resampling.LANCZOS,
                                                 reducing_gap=2.0)
        return np.asarray(resized)

    def _read_stored(self, where: TileRead, dct_scaling: bool
                     ) -> tuple[RGBImage, int] | None:
        """The read from the stored tiles (decoded at 1/scale) and the scale; None where the
        backend must read it (no direct tile access, or a read off the level's pixel grid)."""
        source = self.slide.tile_source()
        level = where.slide_level
        if source is None or level not in source.levels:
            return None
        ds = self.slide.level_downsamples[level]
        lx, ly = (v / ds for v in where.l0_location)
        if not (lx.is_integer() and ly.is_integer()):
            return None
        lv = source.levels[level]
        scale = _dct_scale(lv, (int(lx), int(ly)), where) if dct_scaling else 1
        lw, lh = where.level_size
        region = np.empty((-(-lh // scale), -(-lw // scale), 3), np.uint8)
        bx, by = int(lx) // scale, int(ly) // scale
        prefix = (self.slide.fingerprint, level, scale)
        keys = source.tiles_for_box(level, bx, by, region.shape[1], region.shape[0], scale)
        ahead = [k for k in keys if (*prefix, *k) not in self.decoded] if source.remote else []
        source.prefetch(level, ahead)  # remote: the missing tiles' bytes, fetched in parallel

        def decoded(key: tuple[int, int]) -> RGBImage:
            return self.decoded.get((*prefix, *key),
                                    lambda: source.read_tile(level, *key, scale=scale))

        try:
            source.read_box(level, bx, by, region, decoded, scale, in_place=False)
        finally:  # bytes fetched for a tile another request decoded meanwhile are not kept
            source.discard_ahead(level, ahead)
        return region, scale

    def stored_jpeg(self, dz_level: int, col: int, row: int) -> bytes | None:
        """The tile as the slide stores it, where it is exactly one stored JPEG tile (no
        overlap, the level's tile size, read 1:1 and aligned, whole): no decoding and no
        second lossy generation; it decodes to the pixels :meth:`tile` gives. None
        otherwise (then read and encode :meth:`tile`)."""
        where = self.tile_read(dz_level, col, row)
        ts = self.tile_size
        if self.overlap or where.level_size != where.size or where.size != (ts, ts):
            return None
        source = self.slide.tile_source()
        lv = source.levels.get(where.slide_level) if source is not None else None
        if source is None or lv is None or (lv.tile_w, lv.tile_h) != (ts, ts):
            return None
        ds = self.slide.level_downsamples[where.slide_level]
        lx, ly = (v / ds for v in where.l0_location)
        if not (lx.is_integer() and ly.is_integer()) or int(lx) % ts or int(ly) % ts:
            return None
        return source.stored_jpeg(where.slide_level, int(lx) // ts, int(ly) // ts)

    def dzi(self, image_format: str) -> str:
        """The ``.dzi`` XML describing this pyramid."""
        return dzi_xml(self.level_dimensions[-1], self.tile_size, self.overlap, image_format)


def _dct_scale(lv: TileLevel, at: tuple[int, int], where: TileRead) -> int:
    """The largest of 8, 4, 2 a JPEG level's read can be decoded down by: the read and its
    place divide by it, and the decoded read is still at least the tile's size (1: none).
    Tiles under ``_MIN_SCALED_PX`` a side (a whole slide in a few pixels) are read exactly."""
    (lw, lh), (zw, zh) = where.level_size, where.size
    if not lv.is_jpeg or min(zw, zh) < _MIN_SCALED_PX:
        return 1
    for scale in (8, 4, 2):
        if (lw // scale >= zw and lh // scale >= zh
                and not any(v % scale for v in (*at, lw, lh, lv.tile_w, lv.tile_h))):
            return scale
    return 1


def dzi_xml(size: tuple[int, int], tile_size: int, overlap: int, image_format: str) -> str:
    width, height = size
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{_DZI_NS}" '
            f'Format="{image_format}" Overlap="{overlap}" TileSize="{tile_size}">'
            f'<Size Height="{height}" Width="{width}"/></Image>')
