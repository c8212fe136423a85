"""Synthetic whole-slide images with known ground truth, for demos, tests and benchmarks.

Writes a pyramidal, JPEG-tiled Aperio SVS (readable by openslide and tiffslide) tile by
tile, so memory stays flat whatever the size. Geometry is level-0 pixels: tissue is a set
of ellipses; optional blue and green pen strokes and a black artefact lie on the
background, never on tissue, so a correct detector excludes them entirely.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

from ._io import atomic_path
from .errors import InvalidRequestError
from .types import BoolMask, RGBImage

__all__ = ["DemoSlideSpec", "render_tissue_mask", "write_demo_slide"]

_BACKGROUND = (242, 241, 244)
_BLUE_INK = (40, 70, 200)
_GREEN_INK = (40, 160, 70)
_ARTEFACT = (18, 16, 20)
_TEXTURE_PX = 1024
_SHIFT = 4  # cv2 drawing sub-pixel bits


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float
    angle_deg: float


@dataclass(frozen=True, kw_only=True)
class DemoSlideSpec:
    """What to generate. Sizes in level-0 pixels, ``mpp`` in µm/px."""

    width: int = 16_000
    height: int = 12_000
    mpp: float = 0.5
    seed: int = 0
    n_blobs: int = 4
    tissue_scale: float = 1.0
    """Multiplies blob radii; ~1.0 covers about 13 % of the slide."""
    pen: bool = True
    artefact: bool = True
    tile_px: int = 256
    jpeg_quality: int = 90
    ellipses: tuple[Ellipse, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.width < 256 or self.height < 256 or self.width * self.height > 2e10:
            raise InvalidRequestError(f"demo slide size {self.width}x{self.height} out of range")
        if self.tile_px % 16 or self.tile_px < 16:
            raise InvalidRequestError("tile_px must be a positive multiple of 16")
        rng = np.random.default_rng(self.seed)
        w, h = self.width, self.height
        # With marks, tissue lives in the left 70 % of the slide and marks in the right strip.
        right = 0.7 if (self.pen or self.artefact) else 1.0
        k = math.sqrt(0.13 * w * h / (math.pi * max(self.n_blobs, 1))) * self.tissue_scale
        blobs = []
        for _ in range(self.n_blobs):
            rx = k * rng.uniform(0.8, 1.2)
            ry = k * rng.uniform(0.8, 1.2)
            r = max(rx, ry)
            cx = rng.uniform(min(r, right / 2 * w), max(right * w - r, right / 2 * w))
            cy = rng.uniform(min(r, 0.5 * h), max(h - r, 0.5 * h))
            blobs.append(Ellipse(cx, cy, rx, ry, float(rng.uniform(0, 180))))
        object.__setattr__(self, "ellipses", tuple(blobs))

    @property
    def levels(self) -> list[int]:
        """Downsample factor of each pyramid level (1, 4, 16, ... like Aperio)."""
        out = [1]
        while min(self.width, self.height) // (out[-1] * 4) >= 512:
            out.append(out[-1] * 4)
        return out

    def description(self) -> str:
        w, h = self.width, self.height
        mag = round(10 / self.mpp)
        return (
            f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({self.tile_px}x"
            f"{self.tile_px}) JPEG/RGB Q={self.jpeg_quality}|AppMag = {mag}|MPP = {self.mpp}"
            f"|Filename = wsi-sampler-demo-{self.seed}"
        )


def _draw_shapes(
    canvas: np.ndarray, spec: DemoSlideSpec, origin: tuple[float, float], scale: float,
    *, tissue_color: object, marks: bool,
) -> None:
    """Draw the spec's shapes onto ``canvas`` whose pixel (0,0) is level-0 ``origin``."""
    ox, oy = origin
    f = 1 << _SHIFT

    def pt(x: float, y: float) -> tuple[int, int]:
        return (round((x - ox) / scale * f), round((y - oy) / scale * f))

    for e in spec.ellipses if tissue_color is not None else ():
        axes = (round(e.rx / scale * f), round(e.ry / scale * f))
        cv2.ellipse(canvas, pt(e.cx, e.cy), axes, e.angle_deg, 0, 360, tissue_color, -1,
                    cv2.LINE_8, _SHIFT)
    if not marks:
        return
    w, h = spec.width, spec.height
    thick = max(1, round(max(w, h) * 0.015 / scale))
    if spec.pen:
        blue = np.array([pt(0.76 * w, 0.1 * h), pt(0.9 * w, 0.3 * h), pt(0.8 * w, 0.45 * h)])
        green = np.array([pt(0.92 * w, 0.1 * h), pt(0.78 * w, 0.6 * h)])
        cv2.polylines(canvas, [blue], False, _BLUE_INK, thick, cv2.LINE_AA, _SHIFT)
        cv2.polylines(canvas, [green], False, _GREEN_INK, thick, cv2.LINE_AA, _SHIFT)
    if spec.artefact:
        radius = round(min(w, h) * 0.05 / scale * f)
        cv2.circle(canvas, pt(0.86 * w, 0.8 * h), radius, _ARTEFACT, -1, cv2.LINE_AA, _SHIFT)


def render_tissue_mask(spec: DemoSlideSpec, shape_hw: tuple[int, int]) -> BoolMask:
    """Ground-truth tissue mask of ``spec`` on a grid of ``shape_hw`` covering the slide."""
    h, w = shape_hw
    scale = spec.width / w
    canvas = np.zeros((h, w), np.uint8)
    _draw_shapes(canvas, spec, (0.0, 0.0), scale, tissue_color=1, marks=False)
    return canvas.astype(bool)


def _texture(seed: int) -> RGBImage:
    """Tileable H&E-like texture: eosin-pink stroma with purple nuclei."""
    rng = np.random.default_rng(seed + 1)
    n = _TEXTURE_PX
    base = np.empty((n, n, 3), np.float32)
    base[:] = (226, 150, 190)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (n, n)).astype(np.float32), (0, 0), 6)
    base += (noise / (noise.std() + 1e-6) * 10)[:, :, None]
    nuclei = np.zeros((n, n), np.uint8)
    for x, y in rng.integers(0, n, (1400, 2)):
        cv2.circle(nuclei, (int(x), int(y)), int(rng.integers(3, 7)), 1, -1)
    base[nuclei.astype(bool)] = (118, 70, 158)
    return np.clip(base, 0, 255).astype(np.uint8)


def _level_tiles(spec: DemoSlideSpec, ds: int, texture: RGBImage) -> Iterator[RGBImage]:
    t = spec.tile_px
    lw, lh = math.ceil(spec.width / ds), math.ceil(spec.height / ds)
    n = _TEXTURE_PX
    label = np.zeros((t, t), np.uint8)
    for ty in range(0, lh, t):
        for tx in range(0, lw, t):
            tile = np.empty((t, t, 3), np.uint8)
            tile[:] = _BACKGROUND
            label[:] = 0
            _draw_shapes(label, spec, (tx * ds, ty * ds), ds, tissue_color=1, marks=False)
            if label.any():
                ys = (np.arange(ty, ty + t) % n)[:, None]
                xs = (np.arange(tx, tx + t) % n)[None, :]
                tissue = label.astype(bool)
                tile[tissue] = texture[ys, xs][tissue]
            _draw_shapes(tile, spec, (tx * ds, ty * ds), ds, tissue_color=None, marks=True)
            # Pixels outside the image are padding: keep them background-coloured.
            if tx + t > lw:
                tile[:, lw - tx :] = _BACKGROUND
            if ty + t > lh:
                tile[lh - ty :] = _BACKGROUND
            yield tile



def _counted(tiles: Iterator[RGBImage], done: list[int], total: int,
             progress: Callable[[int, int], None] | None) -> Iterator[RGBImage]:
    for tile in tiles:  # counted as handed out: the writer takes no tile past the last
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
        yield tile


def tile_count(spec: DemoSlideSpec) -> int:
    """How many tiles ``spec``'s pyramid has (all levels)."""
    t = spec.tile_px
    return sum(math.ceil(math.ceil(spec.width / ds) / t) * math.ceil(math.ceil(spec.height / ds)
                                                                     / t)
               for ds in spec.levels)


def write_demo_slide(path: str | os.PathLike[str], spec: DemoSlideSpec | None = None, *,
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``spec`` (default: 16,000 x 12,000 px at 0.5 µm/px, 8 x 6 mm) to ``path``;
    ``progress(tiles_done, tiles_total)`` is called as tiles are written."""
    spec = spec or DemoSlideSpec()
    out = Path(path)
    texture = _texture(spec.seed)
    done, total = [0], tile_count(spec)
    q = {"level": spec.jpeg_quality}
    big = spec.width * spec.height * 3 > 2**31
    with atomic_path(out) as tmp, tifffile.TiffWriter(tmp, bigtiff=big) as tw:
        for i, ds in enumerate(spec.levels):
            shape = (math.ceil(spec.height / ds), math.ceil(spec.width / ds), 3)
            desc = spec.description() if i == 0 else f"Aperio Image Library v12.0.15 \r\n{ds}"
            tw.write(_counted(_level_tiles(spec, ds, texture), done, total, progress),
                     shape=shape, dtype=np.uint8,
                     tile=(spec.tile_px, spec.tile_px), description=desc, photometric="rgb",
                     compression="jpeg", compressionargs=q, metadata=None)
            if i == 0:
                # Aperio keeps a stripped thumbnail as the second page.
                tw.write(_thumbnail(spec, texture), description="Aperio thumbnail",
                         photometric="rgb", compression="jpeg", compressionargs=q, metadata=None)
    return out


def _thumbnail(spec: DemoSlideSpec, texture: RGBImage) -> RGBImage:
    ds = max(spec.width, spec.height) / 768
    tw, th = max(1, round(spec.width / ds)), max(1, round(spec.height / ds))
    img = np.empty((th, tw, 3), np.uint8)
    img[:] = _BACKGROUND
    mask = render_tissue_mask(spec, (th, tw))
    img[mask] = texture[: th, : tw][mask]
    _draw_shapes(img, spec, (0.0, 0.0), spec.width / tw, tissue_color=None, marks=True)
    return img
