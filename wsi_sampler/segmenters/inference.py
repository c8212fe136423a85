"""Run a tissue segmenter over a whole slide, tile by tile, into a low-resolution mask.

Frame: tiles are squares of ``tile_px`` pixels at the card's ``tile_mpp`` (HEST: 512 px at
1 µm/px, no overlap, as its ``segment_tissue_deep`` tiles), laid from the slide's level-0
origin; tiles reaching past the slide read white there. Each tile's mask is averaged down
into the output mask at ``mask_mpp`` (tissue where at least half of the tile's pixels under
an output pixel are), so memory is bounded by a batch of tiles and the output mask, whatever
the slide's size. Tiles of uniform glass are not run (no model output can depend on them;
they count as background).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import numpy.typing as npt

from ..slide import Slide
from ..types import BoolMask
from .card import SegmenterCard
from .model import Segmenter

__all__ = ["segment_artifacts", "segment_slide"]

log = logging.getLogger(__name__)

BATCH = 8
"""Tiles per forward pass (HEST's default batch)."""
_GLASS_MIN_MEAN = 220.0
_GLASS_MAX_STD = 2.0

Tile = tuple[int, int]


def _is_glass(tile: npt.NDArray[np.uint8]) -> bool:
    grey = cv2.cvtColor(tile, cv2.COLOR_RGB2GRAY)
    mean, std = cv2.meanStdDev(grey)
    return bool(mean[0, 0] > _GLASS_MIN_MEAN and std[0, 0] < _GLASS_MAX_STD)


def _tiles(slide: Slide, side0: float) -> list[Tile]:
    w, h = slide.dimensions
    return [(col, row) for row in range(math.ceil(h / side0))
            for col in range(math.ceil(w / side0))]


def _read(slide: Slide, tile: Tile, side0: float, tile_px: int) -> npt.NDArray[np.uint8]:
    x0, y0 = round(tile[0] * side0), round(tile[1] * side0)
    size0 = round((tile[0] + 1) * side0) - x0
    return slide.read_scaled(x0, y0, size0, round((tile[1] + 1) * side0) - y0,
                             (tile_px, tile_px))


def _batches(slide: Slide, tiles: list[Tile], side0: float, tile_px: int
             ) -> Iterator[list[tuple[Tile, npt.NDArray[np.uint8]]]]:
    """Tiles read two batches ahead in threads, batch by batch."""
    with ThreadPoolExecutor(2) as pool:
        read = pool.map(lambda t: (t, _read(slide, t, side0, tile_px)), tiles)
        batch: list[tuple[Tile, npt.NDArray[np.uint8]]] = []
        for item in read:
            batch.append(item)
            if len(batch) == BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def _box(shape: tuple[int, ...], tile: Tile, per_tile: tuple[float, float]
         ) -> tuple[int, int, int, int] | None:
    """The output pixels a tile covers, (x0, y0, x1, y1) unclipped; None when none."""
    mh, mw = shape[:2]
    x0, y0 = round(tile[0] * per_tile[0]), round(tile[1] * per_tile[1])
    x1, y1 = round((tile[0] + 1) * per_tile[0]), round((tile[1] + 1) * per_tile[1])
    if x1 <= x0 or y1 <= y0 or x0 >= mw or y0 >= mh:
        return None
    return x0, y0, x1, y1


def _paste(mask: npt.NDArray[np.uint8], tile: Tile, tissue: npt.NDArray[np.bool_],
           per_tile: tuple[float, float]) -> None:
    """Average one tile's mask into the output pixels it covers (``per_tile``: output px
    per tile side, x and y)."""
    box = _box(mask.shape, tile, per_tile)
    if box is None:
        return
    x0, y0, x1, y1 = box
    small = cv2.resize(tissue.view(np.uint8) * 255, (x1 - x0, y1 - y0),
                       interpolation=cv2.INTER_AREA)
    mh, mw = mask.shape
    mask[y0:min(y1, mh), x0:min(x1, mw)] = small[: min(y1, mh) - y0, : min(x1, mw) - x0]


def _paste_classes(out: npt.NDArray[np.uint8], tile: Tile, classes: npt.NDArray[np.uint8],
                   per_tile: tuple[float, float], n_classes: int) -> None:
    """Each output pixel a tile covers gets the class with the most of its pixels."""
    box = _box(out.shape, tile, per_tile)
    if box is None:
        return
    x0, y0, x1, y1 = box
    present = np.unique(classes)
    shares = np.stack([cv2.resize((classes == c).astype(np.float32), (x1 - x0, y1 - y0),
                                  interpolation=cv2.INTER_AREA) for c in present])
    small = present[shares.argmax(axis=0)].astype(np.uint8)
    assert int(present.max()) < n_classes
    mh, mw = out.shape
    out[y0:min(y1, mh), x0:min(x1, mw)] = small[: min(y1, mh) - y0, : min(x1, mw) - x0]


def segment_slide(
    slide: Slide, segmenter: Segmenter, *, mask_mpp: float,
    progress: Callable[[int, int], None] | None = None,
) -> BoolMask:
    """The slide's tissue mask at ``mask_mpp`` µm/px (the shape ``slide.thumbnail(mpp=…)``
    has), from ``segmenter`` run over the slide as its card says (``tiling``)."""
    if segmenter.card.tiling == "thumbnail":
        return _segment_thumbnail(slide, segmenter, mask_mpp, progress)
    return _segment_tiles(slide, segmenter, mask_mpp, progress)


def _jpeg_round_trip(image: npt.NDArray[np.uint8], quality: int) -> npt.NDArray[np.uint8]:
    # As GrandQC does it: cv2 takes the RGB array for BGR both ways, so the channels come
    # back in their order, compressed with the chroma of that (swapped) reading.
    ok, data = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError("JPEG decoding failed")
    out: npt.NDArray[np.uint8] = decoded
    return out


def _edge_starts(length: int, tile: int) -> list[int]:
    """Tile starts along one side: every whole tile, then one ending at the edge."""
    starts = list(range(0, length - tile + 1, tile))
    if length % tile:
        starts.append(length - tile)
    return starts


def _segment_thumbnail(slide: Slide, segmenter: Segmenter, mask_mpp: float,
                       progress: Callable[[int, int], None] | None) -> BoolMask:
    """The whole slide at the card's µm/px, tiled; edge tiles end at the edge and give only
    the part no whole tile covers."""
    card = segmenter.card
    image = slide.thumbnail(mpp=card.tile_mpp)
    if card.jpeg_quality is not None:
        image = _jpeg_round_trip(image, card.jpeg_quality)
    h, w = image.shape[:2]
    ts = card.tile_px
    padded = np.full((max(h, ts), max(w, ts), 3), 255, np.uint8)
    padded[:h, :w] = image
    starts = [(x, y) for y in _edge_starts(padded.shape[0], ts)
              for x in _edge_starts(padded.shape[1], ts)]
    # shifted edge tiles first: the whole tiles they overlap are written over them
    starts.sort(key=lambda xy: (xy[0] % ts == 0 and xy[1] % ts == 0))
    tissue = np.zeros(padded.shape[:2], bool)
    for i in range(0, len(starts), BATCH):
        batch = starts[i : i + BATCH]
        masks = segmenter.tissue(np.stack([padded[y:y + ts, x:x + ts] for x, y in batch]))
        for (x, y), m in zip(batch, masks, strict=True):
            tissue[y:y + ts, x:x + ts] = m
        if progress is not None:
            progress(min(i + BATCH, len(starts)), len(starts))
    return _resized(tissue[:h, :w], slide, mask_mpp)


def _resized(mask: BoolMask, slide: Slide, mask_mpp: float) -> BoolMask:
    """``mask`` (the whole slide) at ``mask_mpp``: averaged down, or nearest up."""
    mx, my = slide.require_mpp()
    w, h = slide.dimensions
    size = (max(1, round(w * mx / mask_mpp)), max(1, round(h * my / mask_mpp)))
    shrink = size[0] < mask.shape[1]
    out = cv2.resize(mask.view(np.uint8) * 255, size,
                     interpolation=cv2.INTER_AREA if shrink else cv2.INTER_NEAREST)
    resized: BoolMask = out >= 128
    return resized


def _frame(slide: Slide, card: SegmenterCard, mask_mpp: float
           ) -> tuple[float, tuple[int, int], tuple[float, float]]:
    """Level-0 px per tile side, the output mask's (height, width), output px per tile."""
    mx, my = slide.require_mpp()
    w, h = slide.dimensions
    side0 = card.tile_px * card.tile_mpp / mx
    out_w, out_h = max(1, round(w * mx / mask_mpp)), max(1, round(h * my / mask_mpp))
    return side0, (out_h, out_w), (side0 * out_w / w, side0 * out_h / h)


def _run_tiles(slide: Slide, segmenter: Segmenter, tiles: list[Tile], side0: float,
               run: Callable[[list[tuple[Tile, npt.NDArray[np.uint8]]]], None],
               progress: Callable[[int, int], None] | None) -> None:
    """Read ``tiles`` in batches and hand those that are not bare glass to ``run``."""
    card = segmenter.card
    done = ran = 0
    start = time.perf_counter()
    for batch in _batches(slide, tiles, side0, card.tile_px):
        tissue_tiles = [(t, px) for t, px in batch if not _is_glass(px)]
        if tissue_tiles:
            run(tissue_tiles)
            ran += len(tissue_tiles)
        done += len(batch)
        if progress is not None:
            progress(done, len(tiles))
    log.info("segmenter %s: %d of %d tiles run (the rest bare glass) in %.1f s", card.name,
             ran, len(tiles), time.perf_counter() - start)


def _segment_tiles(slide: Slide, segmenter: Segmenter, mask_mpp: float,
                   progress: Callable[[int, int], None] | None) -> BoolMask:
    """Tiles read from the slide at the card's µm/px, averaged into the mask."""
    side0, shape, per_tile = _frame(slide, segmenter.card, mask_mpp)
    mask = np.zeros(shape, np.uint8)

    def run(batch: list[tuple[Tile, npt.NDArray[np.uint8]]]) -> None:
        for (t, _), m in zip(batch, segmenter.tissue(np.stack([px for _, px in batch])),
                             strict=True):
            _paste(mask, t, m, per_tile)

    _run_tiles(slide, segmenter, _tiles(slide, side0), side0, run, progress)
    tissue: BoolMask = mask >= 128
    return tissue


def segment_artifacts(
    slide: Slide, segmenter: Segmenter, tissue: BoolMask, *,
    progress: Callable[[int, int], None] | None = None,
) -> npt.NDArray[np.uint8]:
    """The artefact model's class map over the slide, in ``tissue``'s pixel grid (a mask of
    the whole slide): only tiles holding tissue are run (as GrandQC does), and every pixel
    outside the tissue is the card's background class."""
    card = segmenter.card
    if card.role != "artifacts" or card.background_class is None:
        raise ValueError(f"segmenter {card.name} is not an artefact model")
    mx = slide.require_mpp()[0]
    mask_mpp = slide.dimensions[0] * mx / tissue.shape[1]
    side0, shape, per_tile = _frame(slide, card, mask_mpp)
    out = np.full(tissue.shape, card.background_class, np.uint8)
    n_classes = int(card.architecture_kwargs.get("classes", 256))

    def holds_tissue(t: Tile) -> bool:
        box = _box(tissue.shape, t, per_tile)
        return box is not None and bool(tissue[box[1]:box[3], box[0]:box[2]].any())

    def run(batch: list[tuple[Tile, npt.NDArray[np.uint8]]]) -> None:
        for (t, _), m in zip(batch, segmenter.classes(np.stack([px for _, px in batch])),
                             strict=True):
            _paste_classes(out, t, m, per_tile, n_classes)

    tiles = [t for t in _tiles(slide, side0) if holds_tissue(t)]
    _run_tiles(slide, segmenter, tiles, side0, run, progress)
    out[~tissue] = card.background_class
    return out
