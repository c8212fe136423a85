"""Is a TIFF whole? Checks made when tiffslide opens a slide, before any pixel is read.

tiffslide (through tifffile) opens truncated and damaged files that openslide refuses, and
then returns zeros for tiles it cannot find: a slide cut short would be served as a slide
of background ("no tissue"). A file is refused (:class:`CorruptSlideError`) when

- its chain of image directories (IFDs) points past the end of the file (a file cut short
  loses the directories of its last images: label, macro, lower levels);
- a page's tile (or strip) table has another length than its geometry needs;
- a tile lies past the end of the file, or every tile of a page is absent (offset or byte
  count 0; single absent tiles are sparse tiles, which some scanners write for background).

NDPI files store the high bits of their offsets outside the TIFF structure; tifffile
corrects them, so for NDPI only the page checks (on tifffile's corrected offsets) run.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .errors import CorruptSlideError

__all__ = ["check_tiff_integrity"]

_MAX_IFDS = 100_000


def check_tiff_integrity(tif: Any, size: int, name: str) -> None:
    """Raise CorruptSlideError if ``tif`` (a ``tifffile.TiffFile`` of ``size`` bytes) is
    truncated or its tile tables are damaged."""
    if not getattr(tif, "is_ndpi", False):
        _walk_ifd_chain(tif, size, name)
    for index, page in enumerate(tif.pages):
        _check_page(page, index, size, name)


def _walk_ifd_chain(tif: Any, size: int, name: str) -> None:
    fh, order = tif.filehandle, tif.byteorder
    big = tif.is_bigtiff
    offset_format, count_format, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    offset_size, count_size = struct.calcsize(offset_format), struct.calcsize(count_format)
    fh.seek(8 if big else 4)
    (offset,) = struct.unpack(order + offset_format, fh.read(offset_size))
    seen: set[int] = set()
    while offset:
        if offset in seen or len(seen) >= _MAX_IFDS:
            raise CorruptSlideError(f"{name}: the file is damaged: its TIFF directories "
                                    "form a loop")
        seen.add(offset)
        if offset + count_size > size:
            raise _truncated(name, f"image directory {len(seen)} starts at byte {offset:,}",
                             size)
        fh.seek(offset)
        (entries,) = struct.unpack(order + count_format, fh.read(count_size))
        next_at = offset + count_size + entries * entry_size
        if next_at + offset_size > size:
            raise _truncated(name, f"image directory {len(seen)} ends at byte "
                                   f"{next_at + offset_size:,}", size)
        fh.seek(next_at)
        (offset,) = struct.unpack(order + offset_format, fh.read(offset_size))


def _check_page(page: Any, index: int, size: int, name: str) -> None:
    offsets = np.asarray(getattr(page, "dataoffsets", ()), np.int64)
    counts = np.asarray(getattr(page, "databytecounts", ()), np.int64)
    chunked = getattr(page, "chunked", None)
    expected = int(np.prod(chunked)) if chunked else len(offsets)
    where = f"image {index}"
    if len(offsets) != len(counts) or len(offsets) != expected:
        raise CorruptSlideError(
            f"{name}: the file is damaged: {where} needs {expected:,} tiles but its tile "
            f"table lists {len(offsets):,} offsets and {len(counts):,} sizes")
    if not len(offsets):
        return
    present = (offsets > 0) & (counts > 0)
    if not present.any():
        raise CorruptSlideError(f"{name}: the file is damaged: none of the {expected:,} "
                                f"tiles of {where} is in the file")
    beyond = present & (offsets + counts > size)
    if beyond.any():
        raise _truncated(name, f"{int(beyond.sum()):,} of the {expected:,} tiles of {where} "
                               "lie past its end", size)


def _truncated(name: str, what: str, size: int) -> CorruptSlideError:
    return CorruptSlideError(f"{name}: the file is truncated or damaged: {what} "
                             f"(the file has {size:,} bytes)")
