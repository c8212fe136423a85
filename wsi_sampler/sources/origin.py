"""Where an open slide's bytes come from: the part of a slide that differs by location.

A :class:`~wsi_sampler.slide.Slide` reads pixels through its backend reader and stored
tiles through a :class:`~wsi_sampler._tiles.TileSource`; its origin opens that tile source,
names the slide, fingerprints it and, for remote slides, counts what was fetched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from .._tiles import TileSource

__all__ = ["FINGERPRINT_BYTES", "LocalOrigin", "SlideOrigin", "fingerprint_of"]

FINGERPRINT_BYTES = 1 << 20
"""A file is fingerprinted by its size and this many first bytes."""


def fingerprint_of(size: int, head: bytes) -> str:
    """``sha256:<hex>`` over a file's size and its first bytes: cheap, stable, and the same
    wherever the file is read from (disk, HTTP, S3)."""
    digest = hashlib.sha256(str(size).encode())
    digest.update(head)
    return f"sha256:{digest.hexdigest()}"


class SlideOrigin(Protocol):
    location: str
    """A local path or a URL (never with credentials): for messages and reports."""
    name: str
    """The file name (a DICOMweb series: its series UID)."""
    path: Path | None
    """The local file, or None for a remote slide."""

    def open_tiles(self, level_dimensions: tuple[tuple[int, int], ...]) -> TileSource | None:
        """Direct access to the stored tiles, or None where only the backend can read."""
        ...

    def fingerprint(self) -> str: ...

    def io_stats(self) -> dict[str, int] | None:
        """Requests made and bytes fetched so far (remote slides), or None (local files)."""
        ...

    def close(self) -> None: ...


class LocalOrigin:
    """A slide file (or the first file of a DICOM-WSI folder) on this machine."""

    def __init__(self, path: Path) -> None:
        self.path: Path | None = path
        self._path = path
        self.location = str(path)
        self.name = path.name

    def open_tiles(self, level_dimensions: tuple[tuple[int, int], ...]) -> TileSource | None:
        return TileSource.open(self._path, level_dimensions)

    def fingerprint(self) -> str:
        with self._path.open("rb") as fh:
            return fingerprint_of(self._path.stat().st_size, fh.read(FINGERPRINT_BYTES))

    def io_stats(self) -> dict[str, int] | None:
        return None

    def close(self) -> None:
        """Nothing held: the reader and tile source own the file handles."""
