"""De-identified copies of slides: label and macro images removed, identifying text gone,
the pyramid's tiles kept byte for byte.

A copy of the file is edited in place, as ``anonymize-slide`` does: the directories (IFDs)
of the label and macro images are unlinked from the TIFF directory chain and their pixel
data overwritten with zeros; free-text tags that can carry a patient's or an operator's
name, a barcode or a date are blanked (padded with NULs, so no offset moves). Aperio's
``ImageDescription`` keeps only its technical fields (``AppMag``, ``MPP``, …); other
descriptions are blanked. The result is opened again and checked before it is kept.

Supported: TIFF-based slides (Aperio SVS, generic and Ventana-style pyramidal TIFF,
Hamamatsu NDPI under 4 GiB; classic and BigTIFF). Philips TIFF keeps its label and macro
inside its XML description and DICOM keeps them in other instances: both are refused,
saying so, rather than copied with what they hold.
"""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ._io import atomic_path
from .errors import CorruptSlideError, InvalidRequestError, UnsupportedFormatError

__all__ = ["APERIO_KEEP", "deidentify_file", "deidentify_folder", "load_pseudonyms",
           "pseudonym_for", "sanitise_aperio"]

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
               13: 4, 16: 8, 17: 8, 18: 8}
_DESCRIPTION, _XMP, _IPTC = 270, 700, 33723
_DATA_TAGS = ((273, 279), (324, 325))  # strips, tiles: (offsets, byte counts)
# Free-text tags that may name a person, a case or a date: DocumentName, PageName,
# DateTime, Artist, HostComputer, Copyright, ImageUniqueID.
_BLANKED = {269, 285, 306, 315, 316, 33432, 42016}
_NDPI_MARKER, _NDPI_SOURCE_LENS = 65420, 65421
_NDPI_PRIVATE = range(65420, 65536)
_ASSOCIATED_WORDS = re.compile(r"(?i)\b(label|macro|barcode)")
# Aperio ImageDescription fields that describe the scan, not the patient or operator.
APERIO_KEEP = frozenset({
    "AppMag", "MPP", "Exposure Time", "Exposure Scale", "Focus Offset", "Left", "Top",
    "LineAreaXOffset", "LineAreaYOffset", "LineCameraSkew", "OriginalWidth",
    "OriginalHeight", "StripeWidth", "Filtered", "Gamma", "ICC Profile", "DisplayColor",
    "Power", "Parmset",
})
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".bif", ".scn")


@dataclass(frozen=True)
class _Entry:
    tag: int
    type: int
    count: int
    value_pos: int  # where the value's bytes are (inline or at the offset named)

    @property
    def nbytes(self) -> int:
        return _TYPE_SIZES.get(self.type, 1) * self.count


@dataclass(frozen=True)
class _Ifd:
    offset: int
    entries: dict[int, _Entry]
    next_pos: int  # where this directory's next-directory pointer is
    next_offset: int


class _Tiff:
    """A TIFF file open for in-place edits (classic or BigTIFF, either byte order)."""

    def __init__(self, fh: BinaryIO, name: str) -> None:
        self.fh, self.name = fh, name
        head = self.read(0, 16)
        if head[:2] not in (b"II", b"MM"):
            raise UnsupportedFormatError(f"{name}: not a TIFF-based slide")
        self.order = "<" if head[:2] == b"II" else ">"
        (magic,) = struct.unpack_from(self.order + "H", head, 2)
        if magic not in (42, 43):
            raise UnsupportedFormatError(f"{name}: not a TIFF-based slide")
        self.big = magic == 43
        self.offset_format = "Q" if self.big else "I"
        self.first_pos = 8 if self.big else 4

    def read(self, at: int, n: int) -> bytes:
        self.fh.seek(at)
        data = self.fh.read(n)
        if len(data) != n:
            raise CorruptSlideError(f"{self.name}: the file is truncated at byte {at:,}")
        return data

    def write(self, at: int, data: bytes) -> None:
        self.fh.seek(at)
        self.fh.write(data)

    def read_offset(self, at: int) -> int:
        size = struct.calcsize(self.offset_format)
        return int(struct.unpack(self.order + self.offset_format, self.read(at, size))[0])

    def write_offset(self, at: int, value: int) -> None:
        self.write(at, struct.pack(self.order + self.offset_format, value))

    def ifds(self) -> Iterator[_Ifd]:
        offset, seen = self.read_offset(self.first_pos), set()
        while offset and offset not in seen:
            seen.add(offset)
            ifd = self._ifd(offset)
            yield ifd
            offset = ifd.next_offset

    def _ifd(self, offset: int) -> _Ifd:
        count_format, entry_size, inline = ("Q", 20, 8) if self.big else ("H", 12, 4)
        count_size = struct.calcsize(count_format)
        (n,) = struct.unpack(self.order + count_format, self.read(offset, count_size))
        raw = self.read(offset + count_size, n * entry_size)
        entries = {}
        for i in range(n):
            tag, typ = struct.unpack_from(self.order + "HH", raw, i * entry_size)
            count = struct.unpack_from(self.order + count_format.replace("H", "I"), raw,
                                       i * entry_size + 4)[0]
            pos = offset + count_size + i * entry_size + (12 if self.big else 8)
            value_pos = pos if _TYPE_SIZES.get(typ, 1) * count <= inline else \
                self.read_offset(pos)
            entries[tag] = _Entry(tag, typ, int(count), value_pos)
        next_pos = offset + count_size + n * entry_size
        return _Ifd(offset, entries, next_pos, self.read_offset(next_pos))

    def text(self, entry: _Entry | None) -> str:
        if entry is None or entry.type != 2:
            return ""
        return self.read(entry.value_pos, entry.count).split(b"\0", 1)[0].decode(
            "latin-1")

    def values(self, entry: _Entry) -> list[int]:
        size = _TYPE_SIZES.get(entry.type, 1)
        fmt = {1: "B", 2: "B", 3: "H", 4: "I", 6: "b", 7: "B", 8: "h", 9: "i", 13: "I",
               16: "Q", 17: "q", 18: "Q"}.get(entry.type)
        if fmt is None:
            return []
        data = self.read(entry.value_pos, size * entry.count)
        return list(struct.unpack(f"{self.order}{entry.count}{fmt}", data))

    def blank(self, entry: _Entry, text: str = "") -> None:
        """Overwrite an entry's value: ``text`` (ASCII, cut to fit) padded with NULs."""
        data = text.encode("ascii", "replace")[: max(0, entry.nbytes - 1)]
        self.write(entry.value_pos, data + bytes(entry.nbytes - len(data)))


def sanitise_aperio(description: str) -> str:
    """An Aperio ImageDescription with only its technical fields (:data:`APERIO_KEEP`)."""
    head, *fields = description.split("|")
    kept = [f for f in fields if f.split("=", 1)[0].strip() in APERIO_KEEP]
    return "|".join([head, *kept])


def _kind(tiff: _Tiff, ifds: list[_Ifd]) -> str:
    first = tiff.text(ifds[0].entries.get(_DESCRIPTION)) if ifds else ""
    if first.startswith("Aperio"):
        return "aperio"
    if _NDPI_MARKER in ifds[0].entries:
        return "ndpi"
    if first.lstrip().startswith("<?xml") and "DPUfsImport" in first:
        raise UnsupportedFormatError(
            f"{tiff.name}: Philips TIFF keeps its label and macro inside its XML "
            "description; de-identifying it is not supported")
    return "tiff"


def _is_associated(tiff: _Tiff, kind: str, index: int, ifd: _Ifd) -> bool:
    """Is this directory a label or macro image (never the first: the slide itself)?"""
    if index == 0:
        return False
    if kind == "ndpi":
        lens = ifd.entries.get(_NDPI_SOURCE_LENS)
        if lens is None:
            return False
        raw = tiff.read(lens.value_pos, 4)
        return bool(struct.unpack(tiff.order + "f", raw)[0] < 0)  # -1 macro, -2 its map
    tiled = 322 in ifd.entries
    return not tiled and bool(_ASSOCIATED_WORDS.search(
        tiff.text(ifd.entries.get(_DESCRIPTION))))


def _scrub_text(tiff: _Tiff, kind: str, ifd: _Ifd) -> None:
    for tag, entry in ifd.entries.items():
        if tag == _DESCRIPTION:
            text = tiff.text(entry)
            tiff.blank(entry, sanitise_aperio(text) if kind == "aperio" else "")
        elif tag in _BLANKED or tag in (_XMP, _IPTC) or (
                tag in _NDPI_PRIVATE and entry.type == 2):
            tiff.blank(entry)


def _zero_pixels(tiff: _Tiff, ifd: _Ifd) -> None:
    for offsets_tag, counts_tag in _DATA_TAGS:
        if offsets_tag in ifd.entries and counts_tag in ifd.entries:
            offsets = tiff.values(ifd.entries[offsets_tag])
            counts = tiff.values(ifd.entries[counts_tag])
            for at, n in zip(offsets, counts, strict=False):
                tiff.write(at, bytes(n))
    _scrub_text(tiff, "tiff", ifd)


def _edit(tiff: _Tiff) -> list[int]:
    """Unlink and wipe the associated images, scrub the text of the rest; the indices of
    the directories removed."""
    ifds = list(tiff.ifds())
    if not ifds:
        raise CorruptSlideError(f"{tiff.name}: the TIFF holds no image")
    kind = _kind(tiff, ifds)
    pointer, removed = tiff.first_pos, []
    for index, ifd in enumerate(ifds):
        if _is_associated(tiff, kind, index, ifd):
            _zero_pixels(tiff, ifd)
            removed.append(index)
            continue
        tiff.write_offset(pointer, ifd.offset)
        _scrub_text(tiff, kind, ifd)
        pointer = ifd.next_pos
    tiff.write_offset(pointer, 0)
    return removed


def _check_copy(path: Path) -> None:
    """The copy opens as a slide with no label or macro left."""
    from .slide import open_slide

    with open_slide(path) as slide:
        left = {"label", "macro"} & set(slide.associated_image_names)
        slide.thumbnail(max_size=64)
    if left:
        raise CorruptSlideError(f"{path.name}: de-identification left {sorted(left)} behind")


def deidentify_file(src: str | Path, dst: str | Path) -> list[int]:
    """Write a de-identified copy of the slide ``src`` to ``dst`` (atomically); return the
    indices of the image directories removed (label, macro)."""
    source, target = Path(src), Path(dst)
    if source.is_dir() or source.suffix.lower() == ".dcm":
        raise UnsupportedFormatError(f"{source.name}: DICOM slides keep their label and "
                                     "macro in other instances; de-identify them in the PACS")
    if source.suffix.lower() == ".ndpi" and source.stat().st_size >= 2**32:
        raise UnsupportedFormatError(f"{source.name}: NDPI files of 4 GiB or more store "
                                     "offsets outside TIFF; de-identifying them is not "
                                     "supported")
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
        with tmp.open("r+b") as fh:
            removed = _edit(_Tiff(fh, source.name))
        _check_copy(tmp)
    return removed


def deidentify_folder(src: str | Path, dst: str | Path, *, rename: bool = True
                      ) -> list[tuple[str, str]]:
    """De-identify every slide file under ``src`` into ``dst``: renamed ``slide-<hash>``
    side by side (file and folder names may name a patient), or with their names and
    folder layout kept (``rename=False``). Returns (path in ``src``, path in ``dst``)."""
    root, out = Path(src), Path(dst)
    if out.resolve().is_relative_to(root.resolve()):
        raise InvalidRequestError(f"{out}: the copy must not be inside the source folder")
    done = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()
                       and p.suffix.lower() in SLIDE_SUFFIXES):
        rel = path.relative_to(root).as_posix()
        name = pseudonym_for(rel) if rename else rel
        deidentify_file(path, out / name)
        done.append((rel, name))
    return done


_PSEUDONYM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def load_pseudonyms(path: str | Path) -> dict[str, str]:
    """A pseudonym map: a CSV with columns ``path`` (the slide's path in its root, or its
    file name) and ``pseudonym`` (what it is called instead: letters, digits, ``._-``)."""
    source = Path(path)
    try:
        rows = list(csv.DictReader(source.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidRequestError(f"{source}: cannot read the pseudonym map ({exc})") from exc
    if rows and not {"path", "pseudonym"} <= set(rows[0]):
        raise InvalidRequestError(f"{source}: the pseudonym map needs columns path,pseudonym")
    mapping = {r["path"].strip(): r["pseudonym"].strip() for r in rows}
    bad = [p for p in mapping.values() if not _PSEUDONYM.match(p)]
    if bad:
        raise InvalidRequestError(f"{source}: pseudonyms must be letters, digits and ._- "
                                  f"({len(bad)} are not)")
    if len(set(mapping.values())) != len(mapping):
        raise InvalidRequestError(f"{source}: two slides have the same pseudonym")
    return mapping


def pseudonym_for(rel: str, mapping: dict[str, str] | None = None, *, key: str = "") -> str:
    """What a slide at ``rel`` is called in de-identified mode: its pseudonym from
    ``mapping`` (by path, then by file name), else ``slide-<16 hex digits>`` keyed by
    ``key`` (e.g. its id) or by its path, with the file's extension."""
    mapping = mapping or {}
    name = rel.rsplit("/", 1)[-1]
    found = mapping.get(rel) or mapping.get(name)
    suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in SLIDE_SUFFIXES else ""
    if found:
        return found if Path(found).suffix else found + suffix
    digest = key or hashlib.sha256(rel.encode()).hexdigest()
    return f"slide-{digest[:16]}{suffix}"
