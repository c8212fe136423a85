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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from .errors import InvalidRequestError
from .slide import Slide
from .types import RGBImage

__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TILE_SIZE", "DeepZoom", "TileRead", "dzi_xml"]

DEFAULT_TILE_SIZE = 254
DEFAULT_OVERLAP = 1
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


class DeepZoom:
    """The DeepZoom geometry of ``slide`` (no pixels are read until :meth:`tile`)."""

    def __init__(self, slide: Slide, *, tile_size: int = DEFAULT_TILE_SIZE,
                 overlap: int = DEFAULT_OVERLAP, limit_bounds: bool = False) -> None:
        if not 1 <= tile_size <= 4096:
            raise InvalidRequestError(f"tile_size {tile_size} is outside 1..4096")
        if not 0 <= overlap <= tile_size // 2:
            raise InvalidRequestError(f"overlap {overlap} is outside 0..{tile_size // 2}")
        self.slide = slide
        self.tile_size, self.overlap, self.limit_bounds = tile_size, overlap, limit_bounds
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

    def tile(self, dz_level: int, col: int, row: int) -> RGBImage:
        """Tile (col, row) of ``dz_level`` as (h, w, 3) uint8 RGB."""
        where = self.tile_read(dz_level, col, row)
        pixels = self.slide.read_region(where.l0_location, where.slide_level,
                                        where.level_size)
        if pixels.shape[1::-1] == where.size:
            return pixels
        image = Image.fromarray(pixels)
        image.thumbnail(where.size, Image.Resampling.LANCZOS)
        return np.asarray(image)

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


def dzi_xml(size: tuple[int, int], tile_size: int, overlap: int, image_format: str) -> str:
    width, height = size
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{_DZI_NS}" '
            f'Format="{image_format}" Overlap="{overlap}" TileSize="{tile_size}">'
            f'<Size Height="{height}" Width="{width}"/></Image>')
