"""Serving DeepZoom tiles: open slides kept for a while, encoded tiles in a bounded LRU,
and a cap on the tiles one client has in flight.

A viewer asks for dozens of tiles per second from one slide; opening the slide for each
would cost more than the tile. Slides stay open ``OPEN_FOR_S`` after their last tile (at
most ``MAX_OPEN`` of them); encoded tiles are kept up to ``cache_mb`` in all, keyed by the
slide's fingerprint and every tile parameter (a changed file never serves an old tile), and
the decoded stored tiles neighbouring tiles share up to ``decoded_mb`` (keyed by fingerprint,
level and scale). JPEG tiles use libjpeg's scaled decoding where a level is read at 2-8x
the tile's resolution (:mod:`wsi_sampler.deepzoom`); PNG tiles are the generator's pixels.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from wsi_sampler.deepzoom import DecodedTiles, DeepZoom
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


def _tile_key(fingerprint: str, params: TileParams, level: int, col: int, row: int
              ) -> tuple[str, str, int, int, int]:
    """A tile's key in the encoded-tile cache: a changed file never serves an old tile."""
    return fingerprint, params.tag(), level, col, row


class _Open:
    """An open slide, shared by the requests using it; closed once retired and unused."""

    def __init__(self, slide: Slide) -> None:
        self.slide = slide
        self.used = time.monotonic()
        self.users = 0
        self.retired = False
        self.pyramids: dict[tuple[int, int, bool], DeepZoom] = {}
        self.fingerprint: str | None = None
        """Known once a tile was read (computing it reads the file: not on the event loop)."""


class TileServer:
    def __init__(self, registry: SlideRegistry, cache_mb: float = 64.0,
                 decoded_mb: float = 64.0) -> None:
        self.registry = registry
        self.decoded = DecodedTiles(decoded_mb)
        self._budget = int(cache_mb * 2**20)
        self._used = 0
        self._tiles: OrderedDict[tuple[str, str, int, int, int], bytes] = OrderedDict()
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._lock = threading.Lock()
        self._clients: dict[str, int] = {}

    # -- open slides -------------------------------------------------------------------------
    @contextmanager
    def _using(self, slide_id: str) -> Iterator[_Open]:
        """The slide, opened once and shared; never closed while a request reads it."""
        with self._lock:
            self._retire_old()
            held = self._open.get(slide_id)
            if held is not None:
                self._open.move_to_end(slide_id)
                held.users += 1
        if held is None:
            opened = self.registry.open(slide_id)  # outside the lock: opening may be slow
            spare: Slide | None = opened
            with self._lock:
                held = self._open.get(slide_id)
                if held is None:
                    held = self._open[slide_id] = _Open(opened)
                    spare = None
                held.users += 1
                self._retire_old()
            if spare is not None:  # another request opened it meanwhile
                spare.close()
        held.used = time.monotonic()
        try:
            yield held
        finally:
            with self._lock:
                held.users -= 1
                close = held.retired and held.users == 0
            if close:
                held.slide.close()

    def _retire_old(self) -> None:
        """Under the lock: retire slides idle past OPEN_FOR_S and those over MAX_OPEN (the
        least recently used); each closes now if unused, else when its last user ends."""
        now = time.monotonic()
        stale = [s for s, o in self._open.items() if now - o.used > OPEN_FOR_S]
        stale += list(self._open)[:max(0, len(self._open) - len(stale) - MAX_OPEN)]
        for sid in dict.fromkeys(stale):
            held = self._open.pop(sid)
            held.retired = True
            if held.users == 0:
                held.slide.close()

    def _pyramid(self, held: _Open, params: TileParams) -> DeepZoom:
        key = (params.tile_size, params.overlap, params.limit_bounds)
        if key not in held.pyramids:
            held.pyramids[key] = DeepZoom(held.slide, tile_size=params.tile_size,
                                          overlap=params.overlap,
                                          limit_bounds=params.limit_bounds,
                                          decoded=self.decoded)
        return held.pyramids[key]

    def dzi(self, slide_id: str, params: TileParams) -> tuple[str, str]:
        """The slide's ``.dzi`` XML for ``params`` and its fingerprint."""
        with self._using(slide_id) as held:
            return (self._pyramid(held, params).dzi(params.image_format),
                    held.slide.fingerprint)

    # -- tiles -------------------------------------------------------------------------------
    def tile(self, slide_id: str, params: TileParams, level: int, col: int, row: int
             ) -> tuple[bytes, str]:
        """(encoded tile, fingerprint): from the cache, the stored JPEG, or read + encoded."""
        with self._using(slide_id) as held:
            fingerprint = held.fingerprint = held.slide.fingerprint
            key = _tile_key(fingerprint, params, level, col, row)
            with self._lock:
                cached = self._tiles.get(key)
                if cached is not None:
                    self._tiles.move_to_end(key)
                    return cached, fingerprint
            dz = self._pyramid(held, params)
            jpeg = params.image_format == "jpeg"
            data = dz.stored_jpeg(level, col, row) if jpeg else None
            if data is None:
                data = encode_image(dz.tile(level, col, row, dct_scaling=jpeg),
                                    f".{params.image_format}", jpeg_quality=params.quality)
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = data
                self._used += len(data)
            while self._used > self._budget and self._tiles:
                self._used -= len(self._tiles.popitem(last=False)[1])
        return data, fingerprint

    def cached(self, slide_id: str, params: TileParams, level: int, col: int, row: int
               ) -> tuple[bytes, str] | None:
        """The encoded tile if an open slide's tile is in the cache, without any file access
        (for the event loop: a warm tile needs no thread); None otherwise."""
        with self._lock:
            held = self._open.get(slide_id)
            if held is None or held.fingerprint is None or held.retired:
                return None
            key = _tile_key(held.fingerprint, params, level, col, row)
            data = self._tiles.get(key)
            if data is None:
                return None
            self._tiles.move_to_end(key)
            held.used = time.monotonic()
            return data, held.fingerprint

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
        """At shutdown, after the requests: close every open slide, drop the cache."""
        with self._lock:
            while self._open:
                self._open.popitem()[1].slide.close()
            self._tiles.clear()
        self.decoded.clear()

