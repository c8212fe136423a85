"""Serving DeepZoom tiles: open slides kept for a while, encoded tiles in a bounded LRU,
and a cap on the tiles one client has in flight.

A viewer asks for dozens of tiles per second from one slide; opening the slide for each
would cost more than the tile. Slides stay open ``OPEN_FOR_S`` after their last tile (at
most ``MAX_OPEN`` of them); encoded tiles are kept up to ``cache_mb`` in all, keyed by the
slide's fingerprint and every tile parameter (a changed file never serves an old tile).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from wsi_sampler.deepzoom import DeepZoom
from wsi_sampler.encoding import encode_image
from wsi_sampler.slide import Slide

from .errors import TooBusyError
from .slides import SlideRegistry

__all__ = ["TileParams", "TileServer"]

OPEN_FOR_S = 60.0
MAX_OPEN = 8
PER_CLIENT = 8
"""Tiles one client (API key or address) may have in flight; more are a 429."""


@dataclass(frozen=True)
class TileParams:
    tile_size: int
    overlap: int
    image_format: str
    """``jpeg`` or ``png``."""
    quality: int
    limit_bounds: bool

    def tag(self) -> str:
        return (f"{self.tile_size}-{self.overlap}-{self.image_format}-{self.quality}-"
                f"{int(self.limit_bounds)}")


class _Open:
    def __init__(self, slide: Slide) -> None:
        self.slide = slide
        self.used = time.monotonic()
        self.pyramids: dict[tuple[int, int, bool], DeepZoom] = {}


class TileServer:
    def __init__(self, registry: SlideRegistry, cache_mb: float = 64.0) -> None:
        self.registry = registry
        self._budget = int(cache_mb * 2**20)
        self._used = 0
        self._tiles: OrderedDict[tuple[str, str, int, int, int], bytes] = OrderedDict()
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._lock = threading.Lock()
        self._clients: dict[str, int] = {}

    # -- open slides -------------------------------------------------------------------------
    def _slide(self, slide_id: str) -> _Open:
        with self._lock:
            self._expire()
            held = self._open.pop(slide_id, None)
        if held is None:
            held = _Open(self.registry.open(slide_id))
        held.used = time.monotonic()
        with self._lock:
            self._open[slide_id] = held
            while len(self._open) > MAX_OPEN:
                self._open.popitem(last=False)[1].slide.close()
        return held

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, o in self._open.items() if now - o.used > OPEN_FOR_S]:
            self._open.pop(sid).slide.close()

    def pyramid(self, slide_id: str, params: TileParams) -> tuple[DeepZoom, str]:
        """The slide's DeepZoom geometry for ``params`` and its fingerprint."""
        held = self._slide(slide_id)
        key = (params.tile_size, params.overlap, params.limit_bounds)
        if key not in held.pyramids:
            held.pyramids[key] = DeepZoom(held.slide, tile_size=params.tile_size,
                                          overlap=params.overlap,
                                          limit_bounds=params.limit_bounds)
        return held.pyramids[key], held.slide.fingerprint

    # -- tiles -------------------------------------------------------------------------------
    def tile(self, slide_id: str, params: TileParams, level: int, col: int, row: int
             ) -> tuple[bytes, str]:
        """(encoded tile, fingerprint): from the cache, the stored JPEG, or read + encoded."""
        dz, fingerprint = self.pyramid(slide_id, params)
        key = (fingerprint, params.tag(), level, col, row)
        with self._lock:
            cached = self._tiles.get(key)
            if cached is not None:
                self._tiles.move_to_end(key)
                return cached, fingerprint
        data = dz.stored_jpeg(level, col, row) if params.image_format == "jpeg" else None
        if data is None:
            data = encode_image(dz.tile(level, col, row), f".{params.image_format}",
                                jpeg_quality=params.quality)
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = data
                self._used += len(data)
            while self._used > self._budget and self._tiles:
                self._used -= len(self._tiles.popitem(last=False)[1])
        return data, fingerprint

    async def run(self, client: str, fn: Callable[[], tuple[bytes, str]]) -> tuple[bytes, str]:
        """``fn`` in a thread, at most PER_CLIENT at once for ``client`` (else TooBusyError)."""
        with self._lock:
            if self._clients.get(client, 0) >= PER_CLIENT:
                raise TooBusyError(f"{PER_CLIENT} tiles of this client are in flight; retry")
            self._clients[client] = self._clients.get(client, 0) + 1
        try:
            return await run_in_threadpool(fn)
        finally:
            with self._lock:
                self._clients[client] -= 1
                if not self._clients[client]:
                    del self._clients[client]

    def close(self) -> None:
        with self._lock:
            while self._open:
                self._open.popitem()[1].slide.close()
            self._tiles.clear()

