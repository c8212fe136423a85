"""A JPEG stream's frame, read from its markers without decoding (ITU-T T.81, annex B).

A stored tile handed out as it is (see :meth:`TileSource.stored_jpeg`) is checked here
first: it must be a complete baseline/progressive frame of the tile's size. Damaged tile
data (overwritten, truncated) fails this check and goes down the decoding path, which
reports the damage, instead of reaching a client as a JPEG it cannot read.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["JpegFrame", "jpeg_frame"]

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# Start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8), _SOI, _EOI])


class JpegFrame(NamedTuple):
    width: int
    height: int
    components: int
    precision: int


def _segments_to_scan(stream: bytes) -> JpegFrame | None:
    """The frame header met before the first scan; None if the markers are malformed."""
    frame, pos, end = None, 2, len(stream)
    while pos + 4 <= end:
        if stream[pos] != 0xFF:
            return None
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            if marker != 0x01:  # SOI, EOI or RSTn before the first scan
                return None
            pos += 2
            continue
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            return None
        if marker in _SOF and length >= 8:
            body = stream[pos + 4 : pos + 10]
            frame = JpegFrame(width=int.from_bytes(body[3:5], "big"),
                              height=int.from_bytes(body[1:3], "big"),
                              components=body[5], precision=body[0])
        if marker == _SOS:
            return frame
        pos += 2 + length
    return None


def jpeg_frame(stream: bytes) -> JpegFrame | None:
    """The frame of a complete JPEG stream (SOI, tables, a frame header, a scan, EOI at
    the end, trailing zero padding allowed); None for anything else."""
    if len(stream) < 4 or stream[:2] != b"\xff\xd8":
        return None
    if not stream.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    return _segments_to_scan(stream)
