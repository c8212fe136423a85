"""Damaged copies of slides for the tests of failures."""

from __future__ import annotations

from pathlib import Path

import tifffile


def corrupt_lower_half(src: Path, dst: Path) -> None:
    """Copy ``src`` and overwrite the level-0 tiles of its lower half with garbage."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        down = -(-page.imagelength // page.tilelength)
        for index, (offset, count) in enumerate(
                zip(page.dataoffsets, page.databytecounts, strict=True)):
            if index // across >= down // 2:
                data[offset + 2 : offset + count] = b"\x5a" * (count - 2)
    dst.write_bytes(bytes(data))
