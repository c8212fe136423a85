"""TIFF-based slides (SVS, generic pyramidal TIFF) on an HTTP(S) server or in S3.

tiffslide parses the header through a block-cached file object; the tile fast path reads
each needed tile with a ranged request (neighbours coalesced, fetched ahead in batches).
openslide cannot read remote files, so these slides always open with tiffslide.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, cast

from .._backends import Reader, open_tiff_reader
from .._tiles import TileSource, tiff_tile_levels
from .location import SlideLocation
from .ranged import BlockCache, RangedBytes, RangedFile, RangeFetch

__all__ = ["RemoteTiffOrigin", "open_remote_tiff"]


class RemoteTiffOrigin:
    """The origin of a TIFF-based slide read over ranged requests."""

    path: Path | None = None

    def __init__(self, location: SlideLocation) -> None:
        self.location = location.url
        self.name = location.name
        self.bytes = RangedBytes(location)
        self.blocks = BlockCache(self.bytes)

    def open_tiles(self, level_dimensions: tuple[tuple[int, int], ...]) -> TileSource | None:
        with RangedFile(self.bytes, self.blocks) as fh:
            levels = tiff_tile_levels(cast(BinaryIO, fh), self.location, level_dimensions)
        return TileSource(self.location, levels, RangeFetch(self.bytes)) if levels else None

    def fingerprint(self) -> str:
        return self.bytes.fingerprint()

    def io_stats(self) -> dict[str, int] | None:
        return self.bytes.stats

    def close(self) -> None:
        """Nothing held open: each request is its own (fsspec pools connections)."""


def open_remote_tiff(location: SlideLocation) -> tuple[RemoteTiffOrigin, Reader]:
    """Open a remote TIFF-based slide: its origin and a tiffslide reader over it."""
    origin = RemoteTiffOrigin(location)
    fh = RangedFile(origin.bytes, origin.blocks)
    reader = open_tiff_reader(location.url, cast(BinaryIO, fh))
    return origin, reader
