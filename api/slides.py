"""Slides the service may read: found under the configured roots, addressed by opaque ids.

An id is a hash of (root, relative path): stable across restarts, and never a path, so a
request cannot name a file at all; it can only pick one the scan found. The scan does not
follow symlinks out of a root, and every open re-checks that the resolved file is inside.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from wsi_sampler import Slide, open_slide
from wsi_sampler.batch.discover import SLIDE_FORMATS, discover
from wsi_sampler.errors import (
    InvalidRequestError,
    SlideNotFoundError,
    UnsupportedFormatError,
    WsiSamplerError,
)

__all__ = ["SlideEntry", "SlideRegistry", "UploadTooLargeError", "sniff_format"]

_ID = re.compile(r"^[0-9a-f]{24}$")


class UploadTooLargeError(WsiSamplerError):
    """An upload bigger than the configured limit (HTTP 413)."""


@dataclass(frozen=True)
class SlideEntry:
    id: str
    path: Path
    root: Path
    relpath: str
    format: str
    size_bytes: int


def _slide_id(root: Path, rel: str) -> str:
    return hashlib.sha256(f"{root}\0{rel}".encode()).hexdigest()[:24]


def sniff_format(head: bytes) -> str | None:
    """The container format from a file's first bytes: ``tiff``, ``dicom`` or None."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except OSError:
        return False


class SlideRegistry:
    """Index of the slides under ``roots`` (resolved once), rescanned when an id is unknown."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots: list[Path] = []
        for r in roots:
            r.mkdir(parents=True, exist_ok=True)
            resolved = r.resolve()
            if resolved not in self.roots:
                self.roots.append(resolved)
        self._index: dict[str, SlideEntry] = {}
        self._lock = threading.Lock()

    # -- discovery ----------------------------------------------------------------------------
    def scan(self) -> list[SlideEntry]:
        found: dict[str, SlideEntry] = {}
        for root in self.roots:
            for task in discover(root).slides:  # the same discovery as batch scoring
                self._add(found, root, task.path, task.format)
        with self._lock:
            self._index = found
        return sorted(found.values(), key=lambda e: (str(e.root), e.relpath))

    def _add(self, found: dict[str, SlideEntry], root: Path, path: Path, fmt: str) -> None:
        if not _inside(path, root):  # a symlink that leaves the root: never served
            return
        rel = path.relative_to(root).as_posix()
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() \
            else path.stat().st_size
        sid = _slide_id(root, rel)
        found[sid] = SlideEntry(sid, path, root, rel, fmt, size)

    def get(self, slide_id: str) -> SlideEntry:
        if not _ID.match(slide_id):
            raise SlideNotFoundError(f"unknown slide id {slide_id!r}")
        with self._lock:
            entry = self._index.get(slide_id)
        if entry is None:
            self.scan()
            with self._lock:
                entry = self._index.get(slide_id)
        if entry is None or not _inside(entry.path, entry.root):
            raise SlideNotFoundError(f"unknown slide id {slide_id!r}")
        return entry

    def open(self, slide_id: str, *, mpp_override: float | None = None) -> Slide:
        entry = self.get(slide_id)
        return open_slide(entry.path.resolve(), mpp_override=mpp_override)

    # -- uploads -------------------------------------------------------------------------------
    def store_upload(
        self, uploads: Path, filename: str | None, chunks_head: bytes, tmp: Path
    ) -> SlideEntry:
        """Move a fully received upload ``tmp`` into ``uploads``; it must open as a slide."""
        fmt = sniff_format(chunks_head)
        if fmt is None:
            raise UnsupportedFormatError(
                "the upload is not a whole-slide image (neither TIFF-based nor DICOM content)"
            )
        if fmt == "dicom":
            raise UnsupportedFormatError(
                "single DICOM files are not accepted as uploads: a DICOM-WSI slide is a folder "
                "of instances; place it under a slide root instead"
            )
        suffix = Path(filename or "").suffix.lower()
        ext = suffix if SLIDE_FORMATS.get(suffix) in ("svs", "tiff", "ndpi", "scn", "bif",
                                                       "qptiff") else ".tiff"
        with open_slide(tmp) as slide:  # corrupt or unsupported content: a clear 422
            slide.thumbnail(max_size=256)  # pixels decode too, not just the header
            digest = slide.fingerprint.removeprefix("sha256:")[:16]
        uploads = uploads.resolve()
        if uploads not in self.roots:
            raise InvalidRequestError("uploads are disabled: the upload folder is not a root")
        target = uploads / f"{digest}{ext}"
        if not target.exists():
            shutil.move(str(tmp), str(target))
        else:
            tmp.unlink(missing_ok=True)
        self.scan()
        return self.get(_slide_id(uploads, target.name))


def temp_upload_path(uploads: Path) -> Path:
    tmp_dir = uploads / ".incoming"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tmp_dir / f"{uuid.uuid4().hex}.part"
