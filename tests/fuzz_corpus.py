"""Deterministic damaged slides: seeded mutants of a real or generated classic TIFF slide.

Each mutant is a (name, bytes) pair; the same seed file and index always give the same
bytes. Mutations target what readers trip on: IFD entries (byte flips, zero and absurd
dimensions, tile sizes, tile tables whose counts or offsets point past the end), tile data
(byte flips), truncations, and random bytes behind a TIFF header.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["Entry", "MUTATIONS", "ifd_entries", "mutants"]

_WIDTH, _LENGTH = 256, 257
_TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS = 322, 323, 324, 325
_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8}


@dataclass(frozen=True)
class Entry:
    """One IFD entry of a classic TIFF: where it sits and what it says."""

    pos: int
    tag: int
    type: int
    count: int
    value_pos: int
    """Where the value lives: inside the entry, or at the offset it names."""


def ifd_entries(data: bytes) -> list[Entry]:
    """Every entry of every IFD of a little- or big-endian classic TIFF."""
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack_from(order + "I", data, 4)
    entries: list[Entry] = []
    seen: set[int] = set()
    while 8 <= offset < len(data) - 2 and offset not in seen:
        seen.add(offset)
        (n,) = struct.unpack_from(order + "H", data, offset)
        for i in range(n):
            pos = offset + 2 + 12 * i
            tag, typ, count = struct.unpack_from(order + "HHI", data, pos)
            inline = _SIZES.get(typ, 1) * count <= 4
            value_pos = pos + 8 if inline else struct.unpack_from(order + "I", data, pos + 8)[0]
            entries.append(Entry(pos, tag, typ, count, value_pos))
        (offset,) = struct.unpack_from(order + "I", data, offset + 2 + 12 * n)
    return entries


def _order(data: bytes) -> str:
    return "<" if data[:2] == b"II" else ">"


def _set_value(buf: bytearray, entry: Entry, value: int, index: int = 0) -> None:
    size = 2 if entry.type == 3 else 4
    pos = entry.value_pos + index * size
    if 0 <= pos <= len(buf) - size:
        struct.pack_into(_order(buf) + ("H" if size == 2 else "I"), buf, pos,
                         value & (0xFFFF if size == 2 else 0xFFFFFFFF))


def _pick(entries: list[Entry], tags: tuple[int, ...], rng: random.Random) -> Entry | None:
    matching = [e for e in entries if e.tag in tags]
    return rng.choice(matching) if matching else None


def flip_ifd_bytes(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for entry in rng.sample(ifd_entries(data), k=min(4, len(ifd_entries(data)))):
        buf[entry.pos + rng.randrange(12)] ^= 1 << rng.randrange(8)
    return bytes(buf)


def flip_tile_bytes(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    offsets = [e for e in ifd_entries(data) if e.tag == _TILE_OFFSETS]
    order = _order(data)
    for _ in range(16):
        entry = rng.choice(offsets)
        (start,) = struct.unpack_from(order + "I", data, entry.value_pos
                                      + 4 * rng.randrange(entry.count))
        if start < len(buf):
            buf[start + rng.randrange(min(2048, len(buf) - start))] = rng.randrange(256)
    return bytes(buf)


def truncate(data: bytes, rng: random.Random) -> bytes:
    cut = rng.choice([4, 8, 100, 1000, 4096]) if rng.random() < 0.5 else \
        int(len(data) * rng.choice([0.1, 0.3, 0.5, 0.7, 0.9, 0.99]))
    return data[:cut]


def absurd_dimensions(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    entry = _pick(ifd_entries(data), (_WIDTH, _LENGTH), rng)
    if entry is not None:
        _set_value(buf, entry, rng.choice([0, 1, 1_000_000, 0xFFFF, 0xFFFFFFFF]))
    return bytes(buf)


def bad_tile_size(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    entry = _pick(ifd_entries(data), (_TILE_WIDTH, _TILE_LENGTH), rng)
    if entry is not None:
        _set_value(buf, entry, rng.choice([0, 1, 3, 65535]))
    return bytes(buf)


def tile_table_past_eof(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    entry = _pick(ifd_entries(data), (_TILE_OFFSETS, _TILE_COUNTS), rng)
    if entry is None:
        return bytes(buf)
    if rng.random() < 0.4:  # the entry's count field: a table far longer than the file
        struct.pack_into(_order(buf) + "I", buf, entry.pos + 4, 0x3FFFFFFF)
    else:
        for _ in range(8):
            _set_value(buf, entry, rng.choice([len(data) + 1, 0xFFFFFF00, 1 << 30]),
                       rng.randrange(entry.count))
    return bytes(buf)


def random_after_header(data: bytes, rng: random.Random) -> bytes:
    return data[:8] + rng.randbytes(rng.choice([16, 512, 65536]))


MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [
    flip_ifd_bytes, flip_tile_bytes, truncate, absurd_dimensions, bad_tile_size,
    tile_table_past_eof, random_after_header,
]


def mutants(seed_name: str, data: bytes, count: int) -> Iterator[tuple[str, bytes]]:
    """``count`` mutants of ``data``, cycling through the mutation kinds, seeded by index."""
    for i in range(count):
        mutate = MUTATIONS[i % len(MUTATIONS)]
        rng = random.Random(f"{seed_name}:{i}")
        yield f"{seed_name}-{i:03d}-{mutate.__name__}", mutate(data, rng)
