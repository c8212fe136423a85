"""TIFF-based slides (SVS, generic pyramidal TIFF) on an HTTP(S) server or in S3.

tiffslide parses the header through a block-cached file object; the tile fast path reads
each needed tile with a ranged request (neighbours coalesced, fetched ahead in batches).
openslide cannot read remote files, so these slides always open with tiffslide.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, cast

from .._backends import Reader, open_tiff_reader
from .._tiles import TileSource, tiff_tile_levels
from .location import SlideLocation
from .ranged import BlockCache, RangedBytes, RangedFile, RangeFetch

__all__ = ["RemoteTiffOrigin", "forget_shared_files", "open_remote_tiff"]


class RemoteTiffOrigin:
    """The origin of a TIFF-based slide read over ranged requests."""

    path: Path | None = None

    def __init__(self, location: SlideLocation) -> None:
        self.location = location.url
        self.name = location.name
        self.bytes, self.blocks = _shared_bytes(location)
        self._start = self.bytes.stats

    def open_tiles(self, level_dimensions: tuple[tuple[int, int], ...]) -> TileSource | None:
        with RangedFile(self.bytes, self.blocks) as fh:
            levels = tiff_tile_levels(cast(BinaryIO, fh), self.location, level_dimensions)
        return TileSource(self.location, levels, RangeFetch(self.bytes)) if levels else None

    def fingerprint(self) -> str:
        return self.bytes.fingerprint()

    def io_stats(self) -> dict[str, int] | None:
        """Requests and bytes since this slide was opened (approximate while another
        reader of the same file fetches at the same time)."""
        now = self.bytes.stats
        return {key: now[key] - self._start[key] for key in now}

    def close(self) -> None:
        """Nothing held open: each request is its own (fsspec pools connections)."""


# A file's size and header blocks, shared by the slides opened from it for a minute: a
# service opens a slide per request, and re-reading the header each time would cost a few
# round trips and ~300 KB. Keyed by everything that changes what the URL reaches.
_SHARED_TTL_S = 60.0
_SHARED_MAX = 16
_shared_lock = threading.Lock()
_shared: OrderedDict[tuple[str, ...], tuple[float, RangedBytes, BlockCache]] = OrderedDict()


def _shared_bytes(location: SlideLocation) -> tuple[RangedBytes, BlockCache]:
    key = (location.url, *(os.environ.get(k, "") for k in _ENVIRONMENT))
    now = time.monotonic()
    with _shared_lock:
        hit = _shared.get(key)
        if hit is not None and now - hit[0] < _SHARED_TTL_S:
            _shared.move_to_end(key)
            return hit[1], hit[2]
    source = RangedBytes(location)
    blocks = BlockCache(source)
    with _shared_lock:
        _shared[key] = (now, source, blocks)
        while len(_shared) > _SHARED_MAX:
            _shared.popitem(last=False)
    return source, blocks


_ENVIRONMENT = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
                "WSI_HTTP_CA_BUNDLE")


def forget_shared_files() -> None:
    """Drop the shared sizes and headers (the next open reads them again)."""
    with _shared_lock:
        _shared.clear()


def open_remote_tiff(location: SlideLocation) -> tuple[RemoteTiffOrigin, Reader]:
    """Open a remote TIFF-based slide: its origin and a tiffslide reader over it."""
    origin = RemoteTiffOrigin(location)
    fh = RangedFile(origin.bytes, origin.blocks)
    reader = open_tiff_reader(location.url, cast(BinaryIO, fh))
    return origin, reader
