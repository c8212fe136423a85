"""Find the slides of a folder (recursively): slide files by extension, DICOM-WSI folders
as one slide each; everything else is listed as skipped, with the reason. A remote root (an
S3 prefix, a DICOMweb server) is listed by :mod:`wsi_sampler.sources.listing`."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SlideNotFoundError
from ..sources.location import parse_location

__all__ = ["SLIDE_FORMATS", "Discovery", "SlideTask", "discover", "discover_slides",
           "not_regular_reason"]

SLIDE_FORMATS = {
    ".svs": "svs", ".tif": "tiff", ".tiff": "tiff", ".ndpi": "ndpi", ".scn": "scn",
    ".bif": "bif", ".mrxs": "mrxs", ".vms": "vms", ".vmu": "vmu", ".svslide": "svslide",
    ".qptiff": "qptiff",
}
"""Slide file suffix -> format name (a DICOM-WSI folder is ``dicom``)."""
_SIDECARS = {".dat", ".ini", ".vmp", ".xml", ".json", ".md", ".txt", ".csv"}


@dataclass(frozen=True)
class SlideTask:
    location: str
    """What :func:`~wsi_sampler.open_slide` opens: a local file or DICOM-WSI folder, or the
    URL of a remote slide (``s3://…``, ``dicomweb://…``)."""
    rel: str
    """Path relative to the scanned root (a DICOM-WSI slide: its folder; a DICOMweb
    series: ``studies/<uid>/series/<uid>``)."""
    format: str

    @property
    def path(self) -> Path:
        """The local file or folder (a task found under a local root)."""
        return Path(self.location)

    alias: str = ""
    """Its pseudonym in a de-identified run: then the only name it goes by."""

    @property
    def public(self) -> str:
        """What records and files call the slide: its pseudonym, else its path."""
        return self.alias or self.rel

    @property
    def key(self) -> str:
        """A file-system-safe, unique name for this slide's result folder."""
        if self.alias:
            return Path(self.alias).stem if Path(self.alias).suffix else self.alias
        stem = self.rel.replace("/", "__")
        digest = hashlib.sha256(self.rel.encode()).hexdigest()[:8]
        return f"{stem}-{digest}"


@dataclass
class Discovery:
    slides: list[SlideTask] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(relative path, reason)."""


def _is_mirax_data(path: Path) -> bool:
    return (path.parent.with_suffix(".mrxs")).exists()


def not_regular_reason(path: Path) -> str | None:
    """Why ``path`` (followed if a symlink) must not be opened, or None for a regular file.

    A FIFO, socket or device blocks or streams forever when read; a broken link or a link
    loop cannot be read at all. Only ``stat`` is called: nothing is opened.
    """
    try:
        mode = path.stat().st_mode
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        return f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    return None if stat.S_ISREG(mode) else "not a regular file (FIFO, socket or device)"


def _dicom_folder_problem(folder: Path, filenames: list[str]) -> str | None:
    # openslide reads every file of a DICOM-WSI folder, so each must be a regular file.
    for name in sorted(filenames):
        reason = not_regular_reason(folder / name)
        if reason is not None:
            return f"a DICOM-WSI folder holding {name}, which is {reason}"
    return None


def discover(root: Path) -> Discovery:
    """Slides under ``root`` in path order; hidden files and result folders are ignored."""
    if not root.is_dir():
        raise SlideNotFoundError(f"{root}: not a folder of slides")
    found = Discovery()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        dcm = [f for f in filenames if f.lower().endswith(".dcm")]
        if dcm and here != root:
            rel_dir = here.relative_to(root).as_posix()
            problem = _dicom_folder_problem(here, filenames)
            if problem is None:
                found.slides.append(SlideTask(str(here), rel_dir, "dicom"))
            else:
                found.skipped.append((rel_dir, problem))
            continue
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            suffix = path.suffix.lower()
            if name.startswith("."):
                continue
            if suffix in SLIDE_FORMATS and (reason := not_regular_reason(path)) is not None:
                found.skipped.append((rel, reason))
            elif suffix in SLIDE_FORMATS:
                found.slides.append(SlideTask(str(path), rel, SLIDE_FORMATS[suffix]))
            elif suffix == ".dcm":
                found.skipped.append((rel, "a DICOM file outside a DICOM-WSI folder"))
            elif not _is_mirax_data(path):
                kind = "a sidecar/metadata file" if suffix in _SIDECARS else "not a slide file"
                found.skipped.append((rel, f"{kind} (extension {suffix or 'none'})"))
    found.slides.sort(key=lambda t: t.rel)
    found.skipped.sort()
    return found


def discover_slides(root: str | Path) -> Discovery:
    """Slides under a local folder, an S3 prefix (``s3://bucket/prefix/``) or a DICOMweb
    server (``dicomweb://host/prefix``: every series), in path order. Credentials come from
    the environment (the AWS chain; ``WSI_DICOMWEB_*``). An ``https://`` root is refused by
    the listing: HTTP has no way to list a folder."""
    location = parse_location(root)
    if location.kind == "file":
        return discover(Path(location.url))
    from ..sources.listing import list_remote_root

    found = Discovery()
    for slide in list_remote_root(str(root)):
        found.slides.append(SlideTask(slide.location, slide.relpath, slide.format))
    found.slides.sort(key=lambda t: t.rel)
    return found
