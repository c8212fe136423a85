"""The slides under a remote root: an S3 prefix, or every slide of a DICOMweb server.

A local folder is listed by :func:`wsi_sampler.batch.discover.discover`; these are its
remote counterparts, used by the service's ``remote_slide_roots``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequestError
from .dicomweb import DicomWebCredentials, list_series
from .location import parse_location
from .ranged import open_filesystem, store_errors

__all__ = ["REMOTE_FORMATS", "RemoteSlide", "list_remote_root"]

REMOTE_FORMATS = {".svs": "svs", ".tif": "tiff", ".tiff": "tiff", ".ndpi": "ndpi",
                  ".qptiff": "qptiff", ".bif": "bif", ".scn": "scn"}
"""Suffixes of the TIFF-based formats read remotely (tiffslide; openslide reads local
files only)."""


@dataclass(frozen=True)
class RemoteSlide:
    location: str
    """The URL to open it with."""
    relpath: str
    """Its path below the root (a DICOMweb series: ``studies/<uid>/series/<uid>``)."""
    name: str
    format: str
    size_bytes: int | None


def list_remote_root(
    root_url: str, creds: DicomWebCredentials | None = None
) -> list[RemoteSlide]:
    """Every slide below ``root_url`` (``s3://bucket/prefix/`` or a DICOMweb server)."""
    if root_url.startswith("s3://"):
        return _list_s3(root_url)
    location = parse_location(root_url)
    if location.kind == "dicomweb" and not location.study:
        return [RemoteSlide(s.location, s.relpath, s.name, "dicom", None)
                for s in list_series(root_url, creds)]
    raise InvalidRequestError(
        f"{root_url}: a remote slide root is s3://bucket/prefix/ or a DICOMweb server URL "
        "(dicomweb://host/prefix); HTTP servers cannot be listed, name their slides by URL")


def _list_s3(root_url: str) -> list[RemoteSlide]:
    bucket_prefix = root_url[len("s3://"):].strip("/")
    if not bucket_prefix:
        raise InvalidRequestError(f"{root_url}: name a bucket (s3://bucket/prefix/)")
    fs = open_filesystem("s3")
    with store_errors(root_url):
        found = fs.find(bucket_prefix, detail=True)  # ListObjectsV2, every page
    slides = []
    base = bucket_prefix + "/"
    for key, info in sorted(found.items()):
        suffix = "." + key.rsplit(".", 1)[-1].lower() if "." in key else ""
        if suffix not in REMOTE_FORMATS or info.get("type") != "file":
            continue
        rel = key[len(base):] if key.startswith(base) else key.rsplit("/", 1)[-1]
        slides.append(RemoteSlide(f"s3://{key}", rel, rel.rsplit("/", 1)[-1],
                                  REMOTE_FORMATS[suffix], int(info.get("size") or 0)))
    return slides
