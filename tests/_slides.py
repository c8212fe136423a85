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


def damaged_first_tile(path: Path) -> Path:
    """Write a 2048 x 1536 demo slide at ``path`` whose first level-0 tile keeps its JPEG
    start marker and is scrambled after it (a decoder fails on it, the file still opens)."""
    from wsi_sampler import open_slide
    from wsi_sampler.demo import DemoSlideSpec, write_demo_slide

    write_demo_slide(path, DemoSlideSpec(width=2048, height=1536, pen=False, artefact=False))
    with open_slide(path) as slide:
        source = slide.tile_source()
        assert source is not None
        offset, count = int(source.levels[0].offsets[0]), int(source.levels[0].bytecounts[0])
    with path.open("r+b") as fh:
        fh.seek(offset + 2)
        fh.write(bytes(range(256)) * ((count - 2) // 256))
    return path
