"""Turn a :class:`~wsi_sampler.plan.PatchPlan` into pixels, fast.

Frame: patch coordinates are level-0 pixels; patches come out as uint8 RGB, (H, W, 3)
alone or (N, H, W, 3) in a batch, at the plan's target resolution.

Two paths give the same pixels (within JPEG decoder rounding):

- ``tiles``: reads the plan's pyramid level straight from the stored tiles (see
  :mod:`wsi_sampler._tiles`). A patch that is exactly one stored tile is decoded into its
  batch slot; any other patch is assembled from the tiles it touches, through a bounded
  LRU tile cache shared by the worker threads, then resampled with area averaging (or
  decoded straight at the output size by the scaled DCT, see ``dct_scaling``).
- ``reference``: ``Slide.read_scaled`` per patch (the backend's ``read_region``), used for
  formats the tile path cannot serve (NDPI, DICOM, JPEG XR...).

Work runs in a thread pool, a few batches ahead of the consumer (bounded prefetch), so
memory is bounded by ``batch_size``, ``prefetch_batches`` and ``tile_cache_mb`` whatever
the slide size.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from ._tiles import TileCache, TileKey, TileLevel, TileSource, default_threads, resize_area
from .errors import InvalidRequestError
from .plan import PatchPlan
from .slide import Slide
from .types import RGBImage

__all__ = ["ExtractMode", "Extractor", "PatchBatch", "default_threads"]

ExtractMode = Literal["auto", "tiles", "reference"]

# In plans too short to keep every thread busy, a patch touching at least this many tiles
# (MedGemma at 5x: 49) decodes them in parallel; otherwise patches run in parallel.
_PARALLEL_TILES = 8


@dataclass(frozen=True)
class PatchBatch:
    """Consecutive patches of a plan."""

    images: RGBImage
    """(N, H, W, 3) uint8, C-contiguous."""
    indices: npt.NDArray[np.int64]
    """Positions of these patches in the plan."""
    x0: npt.NDArray[np.int64]
    y0: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.indices)


class _TileReader:
    """Reads level-pixel boxes of one pyramid level from its stored tiles."""

    def __init__(
        self, source: TileSource, level: int, cache_tiles: int, uses: dict[TileKey, int],
        scale: int = 1,
    ) -> None:
        self.source = source
        self.level = level
        self.scale = scale
        self.lv: TileLevel = source.geometry(level, scale)
        self.cache = TileCache(cache_tiles, self._load, uses)

    def _load(self, key: TileKey) -> RGBImage:
        tx, ty = key
        return self.source.read_tile(self.level, tx, ty, scale=self.scale)

    def read_into(
        self, lx: int, ly: int, region: RGBImage, pool: ThreadPoolExecutor | None = None
    ) -> None:
        """Fill ``region`` with level pixels (decoded at ``1/scale``) from (lx, ly), in that
        frame; white outside the level. A patch spanning many tiles has them decoded in
        parallel in ``pool`` first.
        """
        if pool is not None:
            keys = self.source.tiles_for_box(self.level, lx, ly, region.shape[1],
                                             region.shape[0], self.scale)
            if len(keys) >= _PARALLEL_TILES:
                for _ in pool.map(lambda k: self.cache.get(k, use=False), keys):
                    pass
        self.source.read_box(self.level, lx, ly, region, self.cache.get, self.scale)


class Extractor:
    """Read the patches of a plan in batches, in plan order.

    ``threads`` defaults to every core; ``prefetch_batches`` batches are read ahead of the
    consumer; ``tile_cache_mb`` bounds the decoded tiles kept for neighbouring patches.
    ``mode="tiles"`` insists on the tile path (an error where it cannot serve the slide),
    ``"reference"`` forces the backend path, ``"auto"`` picks the tile path when it can.
    ``first_batch_size`` (default ``batch_size``) makes the first batch smaller, so a
    stream's first patches leave sooner. ``dct_scaling`` (default on): where a plan reads
    a level at 2, 4 or 8 times its output resolution (e.g. 0.5 µm/px from a 0.25 µm/px
    scan) and its patches align to that factor, JPEG tiles are decoded straight at the
    output size by libjpeg's scaled inverse DCT instead of decoded whole and area-averaged:
    ~40 % less decoding, no resize; pixels within the tolerance documented in
    :meth:`TileSource.read_tile`. ``dct_scaling=False`` gives exact area averaging.
    """

    def __init__(
        self,
        slide: Slide,
        plan: PatchPlan,
        *,
        batch_size: int = 64,
        threads: int | None = None,
        prefetch_batches: int = 2,
        tile_cache_mb: float = 256.0,
        mode: ExtractMode = "auto",
        first_batch_size: int | None = None,
        dct_scaling: bool = True,
    ) -> None:
        if batch_size < 1:
            raise InvalidRequestError(f"batch_size must be >= 1, got {batch_size}")
        if first_batch_size is not None and first_batch_size < 1:
            raise InvalidRequestError(f"first_batch_size must be >= 1, got {first_batch_size}")
        if prefetch_batches < 1:
            raise InvalidRequestError(f"prefetch_batches must be >= 1, got {prefetch_batches}")
        if threads is not None and threads < 1:
            raise InvalidRequestError(f"threads must be >= 1, got {threads}")
        if mode not in ("auto", "tiles", "reference"):
            raise InvalidRequestError(f"unknown extraction mode {mode!r} (auto, tiles, reference)")
        self.slide = slide
        self.plan = plan
        self.batch_size = batch_size
        self.first_batch_size = first_batch_size or batch_size
        self.threads = threads or default_threads()
        self.prefetch_batches = prefetch_batches
        ds = plan.downsample
        self._lx = np.floor(plan.x0 / ds).astype(np.int64)
        self._ly = np.floor(plan.y0 / ds).astype(np.int64)
        self._region_wh = (max(1, round(plan.width0 / ds)), max(1, round(plan.height0 / ds)))
        self._scale = 1
        self._tiles = self._tile_reader(mode, tile_cache_mb, dct_scaling)
        self._fetched_ahead: set[TileKey] = set()
        self._buffers = threading.local()

    def _tile_reader(
        self, mode: ExtractMode, cache_mb: float, dct_scaling: bool
    ) -> _TileReader | None:
        if mode == "reference":
            return None
        source = self.slide.tile_source()
        if source is None or self.plan.level not in source.levels:
            if mode == "tiles":
                raise InvalidRequestError(
                    f"{self.slide.location}: level {self.plan.level} has no stored tiles the fast "
                    "path can decode; use mode='auto' or 'reference'"
                )
            return None
        lv = source.levels[self.plan.level]
        self._scale = self._dct_scale(lv) if dct_scaling else 1
        geometry = source.geometry(self.plan.level, self._scale)
        cache_tiles = math.floor(cache_mb * 2**20 / (geometry.tile_w * geometry.tile_h * 3))
        return _TileReader(source, self.plan.level, cache_tiles, self._tile_uses(source),
                           self._scale)

    def _dct_scale(self, lv: TileLevel) -> int:
        """The largest of 8, 4, 2 the plan's level reads can be decoded down by (1: none)."""
        rw, rh = self._region_wh
        out = self.plan.patch_size_px
        for scale in (8, 4, 2):
            fits = rw >= out * scale and rh >= out * scale
            aligned = not (rw % scale or rh % scale or lv.tile_w % scale or lv.tile_h % scale)
            if lv.is_jpeg and fits and aligned and not (
                    np.any(self._lx % scale) or np.any(self._ly % scale)):
                return scale
        return 1

    def _tile_uses(self, source: TileSource) -> dict[TileKey, int]:
        """How many patches read each tile through the cache (one-tile patches do not)."""
        level, (rw, rh) = self.plan.level, self._region_wh
        uses: dict[TileKey, int] = {}
        for lx, ly in zip(self._lx.tolist(), self._ly.tolist(), strict=True):
            if source.is_one_tile(level, lx, ly, rw, rh):
                continue
            for key in source.tiles_for_box(level, lx, ly, rw, rh):
                uses[key] = uses.get(key, 0) + 1
        return uses

    @property
    def path_name(self) -> Literal["tiles", "reference"]:
        """Which path serves this plan."""
        return "tiles" if self._tiles is not None else "reference"

    @property
    def dct_scale(self) -> int:
        """1, or the factor tiles are decoded down by (see ``dct_scaling``)."""
        return self._scale

    @property
    def passes_stored_jpeg(self) -> bool:
        """Whether this plan's patches are whole stored JPEG tiles read at their stored size
        (e.g. a 256 px grid at the native level of a slide tiled in 256 px), so a patch can
        be handed out as its stored JPEG instead of decoded and encoded again."""
        t, size = self._tiles, self.plan.patch_size_px
        return (t is not None and t.scale == 1 and t.lv.is_jpeg
                and self._region_wh == (t.lv.tile_w, t.lv.tile_h) == (size, size))

    def stored_jpegs(self, indices: Sequence[int]) -> list[bytes | None]:
        """Each patch as the JPEG its pixels are stored as (:meth:`TileSource.stored_jpeg`):
        no decoding, no second lossy generation. None for a patch that is not one whole
        stored tile (over the level's edge; a plan that resamples; a sparse or damaged
        tile): read those with :meth:`read_patch`."""
        if not self.passes_stored_jpeg:
            return [None] * len(indices)
        assert self._tiles is not None
        source, level, (rw, rh) = self._tiles.source, self.plan.level, self._region_wh
        keys: list[TileKey | None] = []
        for i in indices:
            lx, ly = int(self._lx[i]), int(self._ly[i])
            one = source.is_one_tile(level, lx, ly, rw, rh)
            keys.append((lx // rw, ly // rh) if one else None)
        source.prefetch(level, [k for k in keys if k is not None])  # remote only
        return [None if k is None else source.stored_jpeg(level, *k) for k in keys]

    # -- one patch --------------------------------------------------------------------------
    def read_patch(self, index: int) -> RGBImage:
        """Read patch ``index`` of the plan."""
        size = self.plan.patch_size_px
        out = np.empty((size, size, 3), np.uint8)
        self._read_into(index, out)
        return out

    def _read_into(
        self, index: int, out: RGBImage, tile_pool: ThreadPoolExecutor | None = None
    ) -> None:
        p = self.plan
        if self._tiles is None:
            out_wh = (out.shape[1], out.shape[0])
            out[:] = self.slide.read_scaled(
                int(p.x0[index]), int(p.y0[index]), p.width0, p.height0, out_wh
            )
            return
        s = self._scale
        lx, ly = int(self._lx[index]) // s, int(self._ly[index]) // s
        rw, rh = self._region_wh[0] // s, self._region_wh[1] // s
        if (rw, rh) == (out.shape[1], out.shape[0]):
            self._tiles.read_into(lx, ly, out, tile_pool)
            return
        region = self._region_buffer(rh, rw)
        self._tiles.read_into(lx, ly, region, tile_pool)
        resize_area(region, (out.shape[1], out.shape[0]), out=out)

    def _region_buffer(self, h: int, w: int) -> RGBImage:
        buf: RGBImage | None = getattr(self._buffers, "region", None)
        if buf is None or buf.shape != (h, w, 3):
            buf = np.empty((h, w, 3), np.uint8)
            self._buffers.region = buf
        return buf

    # -- batches ----------------------------------------------------------------------------
    def batch_bounds(self) -> Iterator[tuple[int, int]]:
        """(start, end) of each batch: ``first_batch_size``, then ``batch_size``."""
        n, start, size = len(self.plan), 0, self.first_batch_size
        while start < n:
            end = min(start + size, n)
            yield start, end
            start, size = end, self.batch_size

    def _submit(
        self, pool: ThreadPoolExecutor, tile_pool: ThreadPoolExecutor | None,
        bounds: tuple[int, int],
    ) -> tuple[PatchBatch, list[Future[None]]]:
        idx = np.arange(*bounds, dtype=np.int64)
        if self._tiles is not None and self._tiles.source.remote:
            self._fetch_ahead(idx)
        size = self.plan.patch_size_px
        images = np.empty((len(idx), size, size, 3), np.uint8)
        futures = [
            pool.submit(self._read_into, int(i), images[slot], tile_pool)
            for slot, i in enumerate(idx)
        ]
        return PatchBatch(images, idx, self.plan.x0[idx], self.plan.y0[idx]), futures

    def _fetch_ahead(self, idx: npt.NDArray[np.int64]) -> None:
        """Remote slides: ask for every tile of these patches at once, so they arrive in
        batched, parallel requests instead of one round trip per tile."""
        assert self._tiles is not None
        source, level, (rw, rh) = self._tiles.source, self.plan.level, self._region_wh
        keys = []
        for i in idx.tolist():
            for key in source.tiles_for_box(level, int(self._lx[i]), int(self._ly[i]), rw, rh):
                if key not in self._fetched_ahead:
                    self._fetched_ahead.add(key)
                    keys.append(key)
        source.prefetch(level, keys)

    def iter_batches(self) -> Generator[PatchBatch, None, None]:
        """Yield batches in plan order; stopping early cancels the reads ahead."""
        batches = self.batch_bounds()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wsi-extract")
        # Tiles of one large patch decode here; a separate pool, so patch tasks waiting on
        # their tiles can never starve the tile tasks. Only for plans shorter than the pool.
        tile_pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="wsi-extract-tiles")
            if len(self.plan) < 2 * self.threads else None
        )
        pending: deque[tuple[PatchBatch, list[Future[None]]]] = deque()
        try:
            for bounds in batches:
                pending.append(self._submit(pool, tile_pool, bounds))
                if len(pending) > self.prefetch_batches:
                    break
            while pending:
                batch, futures = pending.popleft()
                for fut in futures:
                    fut.result()
                following = next(batches, None)
                if following is not None:
                    pending.append(self._submit(pool, tile_pool, following))
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if tile_pool is not None:
                tile_pool.shutdown(wait=True, cancel_futures=True)

    def iter_patches(self) -> Iterator[tuple[int, RGBImage]]:
        """Yield ``(index, patch)`` pairs in plan order."""
        for batch in self.iter_batches():
            yield from zip(batch.indices.tolist(), batch.images, strict=True)

    @property
    def cache_stats(self) -> dict[str, int]:
        """Tile cache hits and misses so far (zeros on the reference path)."""
        if self._tiles is None:
            return {"hits": 0, "misses": 0}
        return {"hits": self._tiles.cache.hits, "misses": self._tiles.cache.misses}
