"""Where a slide lives: a local path, an HTTP(S) URL, an S3 object, or a DICOMweb series.

Forms accepted wherever a slide is named (CLI, Python, service slide roots):

- ``/data/slide.svs`` or ``file:///data/slide.svs``: a local file or DICOM-WSI folder;
- ``https://host/path/slide.svs`` (``http://`` too): a file on a web server that honours
  HTTP Range requests, read tile by tile;
- ``s3://bucket/key.svs``: an object in S3 or an S3-compatible store (credentials and the
  endpoint from the standard AWS environment: ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``...,
  ``AWS_ENDPOINT_URL_S3`` for MinIO / Ceph / GCS interop);
- ``dicomweb://host/dicom-web/studies/<study>/series/<series>``: one DICOM-WSI series of a
  DICOMweb server over HTTPS; ``dicomweb+http://`` for a server without TLS (loopback,
  a lab network) and ``dicomweb+https://`` to say HTTPS explicitly. Without the
  ``/studies/…`` part the URL names the server (a service slide root: all its slides).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from ..errors import InvalidRequestError

__all__ = ["LocationKind", "SlideLocation", "is_remote", "parse_location"]

LocationKind = Literal["file", "http", "s3", "dicomweb"]

_DICOMWEB_SCHEMES = {"dicomweb": "https", "dicomweb+https": "https", "dicomweb+http": "http"}
_SERIES = re.compile(
    r"^(?P<base>.*?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class SlideLocation:
    """A parsed slide location; ``url`` never carries credentials."""

    kind: LocationKind
    url: str
    """The location as given (a local path for ``file``), without user:password."""
    server: str = ""
    """DICOMweb: the server's base URL (``http(s)://host:port/prefix``)."""
    study: str = ""
    series: str = ""

    @property
    def name(self) -> str:
        """The last path component (a DICOM series: its series UID)."""
        if self.kind == "dicomweb":
            return self.series or self.study
        return self.url.rstrip("/").rsplit("/", 1)[-1]


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a slide on a server rather than on this machine."""
    return isinstance(location, str) and parse_location(location).kind != "file"


def parse_location(location: str | os.PathLike[str]) -> SlideLocation:
    """Parse a slide location; an unknown scheme or a URL with credentials is refused."""
    if not isinstance(location, str):
        return SlideLocation("file", os.fspath(location))
    scheme = location.split("://", 1)[0].lower() if "://" in location else ""
    if not scheme:
        return SlideLocation("file", location)
    parts = urlsplit(location)
    if parts.username or parts.password:
        raise InvalidRequestError(
            "credentials in a slide URL would end up in logs and reports; give them through "
            "the environment (AWS_* for S3, WSI_DICOMWEB_* for DICOMweb)"
        )
    if scheme == "file":
        return SlideLocation("file", parts.path)
    if scheme in ("http", "https"):
        _require_host(parts.netloc, location)
        return SlideLocation("http", location)
    if scheme == "s3":
        if not parts.netloc:
            raise InvalidRequestError(f"{location}: an S3 location is s3://bucket/key")
        return SlideLocation("s3", location)
    if scheme in _DICOMWEB_SCHEMES:
        return _parse_dicomweb(location, _DICOMWEB_SCHEMES[scheme])
    raise InvalidRequestError(
        f"{location}: unknown scheme {scheme!r} (a local path, http(s)://, s3://, "
        "dicomweb://, dicomweb+http://)"
    )


def _require_host(netloc: str, location: str) -> None:
    if not netloc:
        raise InvalidRequestError(f"{location}: the URL names no host")


def _parse_dicomweb(location: str, http_scheme: str) -> SlideLocation:
    parts = urlsplit(location)
    _require_host(parts.netloc, location)
    path = parts.path.rstrip("/")
    match = _SERIES.match(path)
    base_path, study, series = (match["base"], match["study"], match["series"] or "") \
        if match else (path, "", "")
    if "/studies" in base_path or (match is None and "/studies/" in path + "/"):
        raise InvalidRequestError(
            f"{location}: a DICOMweb slide is …/studies/<study UID>/series/<series UID>"
        )
    for uid in (study, series):
        if uid and (len(uid) > 64 or not _UID.match(uid)):
            raise InvalidRequestError(f"{location}: {uid!r} is not a DICOM UID")
    server = urlunsplit((http_scheme, parts.netloc, base_path, "", ""))
    return SlideLocation("dicomweb", location, server=server, study=study, series=series)
