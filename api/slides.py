"""Slides the service may read: found under the configured roots, addressed by opaque ids.

An id is a hash of (root, relative path): stable across restarts, and never a path, so a
request cannot name a file at all; it can only pick one the scan found. The scan does not
follow symlinks out of a root (for a DICOM-WSI folder: none of its files), lists only
regular files, and every open re-checks both.

Remote roots (an S3 prefix, a DICOMweb server) are listed the same way and their slides
opened by URL. Listing them is a network round trip (paged), so they are listed at start
and by the background refresh only; a root whose server is down keeps its last listing
(logged) and never hides the other roots.

The index is built off the event loop and kept: a background thread refreshes it every
``refresh_s`` seconds, a listing refreshes the local roots when older than a second, and
an upload adds to it. A request for an unknown id never scans.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from wsi_sampler import Slide, open_slide
from wsi_sampler.batch.discover import SLIDE_FORMATS, discover, not_regular_reason
from wsi_sampler.deidentify import pseudonym_for
from wsi_sampler.errors import (
    InvalidRequestError,
    SlideNotFoundError,
    WsiSamplerError,
)
from wsi_sampler.sources.dicomweb import DicomWebCredentials
from wsi_sampler.sources.listing import list_remote_root
from wsi_sampler.sources.location import parse_location

__all__ = ["SlideEntry", "SlideRegistry", "SlideSource", "UploadTooLargeError", "root_source"]

logger = logging.getLogger("wsi_sampler.api.slides")
_ID = re.compile(r"^[0-9a-f]{24}$")
_LIST_MAX_AGE_S = 1.0


class UploadTooLargeError(WsiSamplerError):
    """An upload or request body bigger than the configured limit (HTTP 413)."""


SlideSource = Literal["local", "s3", "dicomweb"]


@dataclass(frozen=True)
class SlideEntry:
    id: str
    location: str
    """A local path, or the URL of a remote slide."""
    root: str
    relpath: str
    name: str
    format: str
    size_bytes: int | None
    source: SlideSource = "local"
    path: Path | None = None
    """The local file or DICOM folder (None for a remote slide)."""
    local_root: Path | None = None


def root_source(root: str) -> SlideSource:
    """Where a remote root's slides live (the config validated it is one of these)."""
    return "s3" if parse_location(root).kind == "s3" else "dicomweb"


def _slide_id(root: Path | str, rel: str) -> str:
    return hashlib.sha256(f"{root}\0{rel}".encode()).hexdigest()[:24]


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # missing, or a symlink loop (RuntimeError < 3.13)
        return False


def _files_of(path: Path) -> list[Path]:
    """The files a slide is read from: itself, or every file of its DICOM-WSI folder."""
    if path.is_dir():
        return [p for p in sorted(path.iterdir()) if not p.name.startswith(".")]
    return [path]


def servable(path: Path, root: Path) -> bool:
    """Whether every file of the slide is a regular file that resolves inside ``root``."""
    try:
        files = _files_of(path) if _inside(path, root) else []
    except OSError:
        return False
    return bool(files) and all(
        _inside(f, root) and (f.is_dir() or not_regular_reason(f) is None) for f in files
    )


def name_file(stored: Path) -> Path:
    """Where an upload's original file name is kept: ``.<stored name>.name`` beside it."""
    return stored.with_name(f".{stored.name}.name")


class NotDeletableError(WsiSamplerError):
    """A slide in a configured root or on a server: not deletable over the API (405)."""


class SlideRegistry:
    """Index of the slides under ``roots`` (resolved once), refreshed off the event loop."""

    def __init__(
        self, roots: list[Path], *, refresh_s: float = 30.0, remote_roots: list[str] | None = None,
        dicomweb_credentials: DicomWebCredentials | None = None, deidentify: bool = False,
        pseudonyms: dict[str, str] | None = None, uploads: Path | None = None,
    ) -> None:
        self.uploads = uploads.resolve() if uploads is not None else None
        """The root that holds uploads (their names kept beside them; they can be deleted)."""
        self.deidentify = deidentify
        """Slides are named by pseudonym (``pseudonyms``, else derived from the id) in
        every answer and file; their paths and DICOM descriptions are never shown."""
        self._pseudonyms = pseudonyms or {}
        self.remote_roots = list(dict.fromkeys(remote_roots or []))
        self._credentials = dicomweb_credentials
        self._remote: dict[str, dict[str, SlideEntry]] = {r: {} for r in self.remote_roots}
        self._remote_errors: dict[str, str] = {}
        self.roots: list[Path] = []
        for r in roots:
            r.mkdir(parents=True, exist_ok=True)
            resolved = r.resolve()
            if resolved not in self.roots:
                self.roots.append(resolved)
        self._index: dict[str, SlideEntry] = {}
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._scanned_at = 0.0
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._refresh_s = refresh_s

    # -- discovery ----------------------------------------------------------------------------
    def scan(self) -> list[SlideEntry]:
        """Rescan every root now (one scan at a time; a caller waiting on one reuses it)."""
        started = time.monotonic()
        with self._scan_lock:
            if self._scanned_at < started:
                found: dict[str, SlideEntry] = {}
                for root in self.roots:
                    for task in discover(root).slides:  # the same discovery as batch scoring
                        self._add(found, root, task.path, task.format)
                with self._lock:
                    for remote in self._remote.values():
                        found.update(remote)
                    self._index = found
                self._scanned_at = time.monotonic()
        return self.entries()

    def entries(self, *, max_age_s: float | None = None) -> list[SlideEntry]:
        """The indexed slides in path order; rescanned first if older than ``max_age_s``."""
        if max_age_s is not None and time.monotonic() - self._scanned_at > max_age_s:
            return self.scan()
        with self._lock:
            values = list(self._index.values())
        return sorted(values, key=lambda e: (e.root, e.relpath))

    def listing(self) -> list[SlideEntry]:
        return self.entries(max_age_s=_LIST_MAX_AGE_S)

    def _add(self, found: dict[str, SlideEntry], root: Path, path: Path, fmt: str) -> None:
        if not servable(path, root):  # a symlink that leaves the root: never served
            return
        try:
            size = sum(p.stat().st_size for p in _files_of(path))
        except OSError:
            return
        rel = path.relative_to(root).as_posix()
        sid = _slide_id(root, rel)
        found[sid] = self._public(SlideEntry(sid, str(path), str(root), rel,
                                             self._local_name(root, path), fmt, size, "local",
                                             path, root))

    def _local_name(self, root: Path, path: Path) -> str:
        """A file's name; an upload's, the name it was uploaded under (when it had one)."""
        sidecar = name_file(path)
        if root == self.uploads and sidecar.is_file():
            try:
                return sidecar.read_text(encoding="utf-8").strip() or path.name
            except (OSError, UnicodeDecodeError):
                pass
        return path.name

    def delete_upload(self, slide_id: str) -> SlideEntry:
        """Remove an uploaded slide (file and name); other slides are not ours to delete."""
        entry = self.get(slide_id)
        if entry.path is None or entry.local_root is None or entry.local_root != self.uploads:
            where = "on a slide server" if entry.path is None else "in a configured slide root"
            raise NotDeletableError(f"{entry.relpath} is {where}: only uploads can be "
                                    "deleted here (manage the others where they are kept)")
        entry.path.unlink(missing_ok=True)
        name_file(entry.path).unlink(missing_ok=True)
        with self._lock:
            self._index.pop(slide_id, None)
        return entry

    def _public(self, entry: SlideEntry) -> SlideEntry:
        """The entry as answers show it: in de-identified mode named by its pseudonym."""
        if not self.deidentify:
            return entry
        name = pseudonym_for(entry.relpath, self._pseudonyms, key=entry.id)
        return replace(entry, name=name, relpath=name)

    def scan_remote(self) -> None:
        """List every remote root again; one that fails keeps its last listing."""
        for root in self.remote_roots:
            try:
                listed = list_remote_root(root, self._credentials)
            except WsiSamplerError as exc:
                logger.warning("listing the remote slide root %s failed, keeping its last "
                               "listing: %s", root, exc)
                with self._lock:
                    self._remote_errors[root] = str(exc)
                continue
            entries = {}
            for slide in listed:
                sid = _slide_id(root, slide.relpath)
                entries[sid] = self._public(SlideEntry(
                    sid, slide.location, root, slide.relpath, slide.name, slide.format,
                    slide.size_bytes, root_source(root)))
            with self._lock:
                self._remote[root] = entries
                self._remote_errors.pop(root, None)
        self._scanned_at = 0.0  # the next listing merges them in

    def root_errors(self) -> dict[str, str]:
        """Remote root -> why its last listing failed (roots listed fine are absent)."""
        with self._lock:
            return dict(self._remote_errors)

    def start(self) -> None:
        """Scan now, then refresh in a background thread until :meth:`close`."""
        self.scan_remote()
        self.scan()
        self._refresher = threading.Thread(target=self._refresh_loop, name="wsi-slide-index",
                                           daemon=True)
        self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._refresh_s):
            try:
                self.scan_remote()
                self.scan()
            except Exception:  # a root that vanished for a moment must not stop the refresh
                logger.exception("refreshing the slide index failed")

    def close(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)

    # -- lookup --------------------------------------------------------------------------------
    def get(self, slide_id: str) -> SlideEntry:
        """The indexed slide, re-checked on disk; unknown ids are 404 at once (no scan)."""
        with self._lock:
            entry = self._index.get(slide_id) if _ID.match(slide_id) else None
        if entry is None or (entry.path is not None and entry.local_root is not None
                             and not servable(entry.path, entry.local_root)):
            raise SlideNotFoundError(f"unknown slide id {slide_id!r}")
        return entry

    def open(self, slide_id: str, *, mpp_override: float | None = None) -> Slide:
        """Open a slide, named as listed (its path in its root, or its pseudonym): what
        it says of itself in messages and files never tells where the server keeps it."""
        entry = self.get(slide_id)
        if entry.path is None:
            slide = open_slide(entry.location, mpp_override=mpp_override,
                               dicomweb_credentials=self._credentials)
        else:
            slide = open_slide(entry.path.resolve(), mpp_override=mpp_override)
        slide.pseudonymise(entry.name, entry.relpath)
        return slide

    def add_upload(self, root: Path, path: Path) -> SlideEntry:
        """Index a file just stored in ``root`` (an upload) and return its entry."""
        root = root.resolve()
        if root not in self.roots:
            raise InvalidRequestError("uploads are disabled: the upload folder is not a root")
        found: dict[str, SlideEntry] = {}
        self._add(found, root, path, SLIDE_FORMATS.get(path.suffix.lower(), "tiff"))
        if not found:
            raise SlideNotFoundError("the stored upload could not be indexed")
        (entry,) = found.values()
        with self._lock:
            self._index[entry.id] = entry
        return entry
