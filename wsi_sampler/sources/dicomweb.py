"""DICOM-WSI series on a DICOMweb server (a PACS: Orthanc, dcm4chee, Google Healthcare...).

QIDO-RS finds series, WADO-RS fetches metadata and frames, through ``wsidicom``'s DICOMweb
client (``dicomweb-client`` over ``requests``). Only the frames a read needs are fetched:
the tile fast path asks for JPEG frames in batches (one multipart request per batch,
several batches in parallel) and decodes them itself, as it does TIFF tiles; other
transfer syntaxes are read through wsidicom.

Credentials and TLS come from the environment, never from the URL:

- ``WSI_DICOMWEB_TOKEN``: a bearer token (``Authorization: Bearer …``); or
- ``WSI_DICOMWEB_USERNAME`` and ``WSI_DICOMWEB_PASSWORD``: HTTP basic auth;
- ``WSI_DICOMWEB_CA_BUNDLE``: a CA bundle to verify the server with (TLS verification is
  always on for https).

Opening a series reads its instance metadata (a few MB for a large slide: ~2 s on
Orthanc for the demo slide), so open series are kept in a small LRU for a few minutes and
shared by every :class:`~wsi_sampler.slide.Slide` that opens the same series.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._backends import to_rgb
from .._tiles import TileLevel, TileSource
from ..errors import (
    CorruptSlideError,
    SlideNotFoundError,
    SlideStoreError,
    SlideStoreUnavailableError,
    UnsupportedFormatError,
    WsiSamplerError,
    describe_backend_error,
    store_status_error,
)
from ..redact import public_url
from ..types import Backend, RGBImage
from .location import SlideLocation

# pydicom warns that bulk data (the ICC profile, a bulk-data URI) is not fetched: not needed.
# A filter for the process, not catch_warnings() around the open: catch_warnings is not
# thread-safe, and series are opened from several threads at once (service, batch runs).
warnings.filterwarnings("ignore", "No bulk data URI handler", UserWarning)

__all__ = [
    "DicomWebCredentials", "DicomWebOrigin", "DicomWebReader", "RemoteSeries",
    "forget_open_series", "list_series", "open_dicomweb",
]

_CONNECT_TIMEOUT_S = 10.0
_READ_TIMEOUT_S = 60.0
_OPEN_CACHE_SIZE = 8
_OPEN_CACHE_TTL_S = 300.0
_QIDO_PAGE = 200
# Transfer syntaxes whose frames the tile path decodes (JPEG baseline / extended 8-bit).
_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
# libjpeg colour spaces (imagecodecs' jpeg8_decode): JCS_RGB, JCS_YCbCr.
_JCS_RGB, _JCS_YCBCR = 2, 3
_COLORSPACES = {"RGB": _JCS_RGB, "YBR_FULL": _JCS_YCBCR, "YBR_FULL_422": _JCS_YCBCR}


@dataclass(frozen=True)
class DicomWebCredentials:
    """How to authenticate to the DICOMweb server and verify its certificate."""

    token: str = ""
    username: str = ""
    password: str = ""
    ca_bundle: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> DicomWebCredentials:
        return cls(env.get("WSI_DICOMWEB_TOKEN", ""), env.get("WSI_DICOMWEB_USERNAME", ""),
                   env.get("WSI_DICOMWEB_PASSWORD", ""), env.get("WSI_DICOMWEB_CA_BUNDLE", ""))

    def identity(self) -> str:
        """A digest that tells credentials apart (cache keys) without holding them."""
        text = "\0".join((self.token, self.username, self.password, self.ca_bundle))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Counter:
    """Requests and response bytes of one session (DICOMweb servers often send chunked
    responses without Content-Length, so the body is measured)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0

    def hook(self, response: Any, *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += len(response.content)

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.requests, self.bytes


def _session(creds: DicomWebCredentials, counter: _Counter) -> Any:
    import requests

    class _TimeoutSession(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", (_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S))
            # never off the configured server (with its credentials) to wherever it points
            kwargs["allow_redirects"] = False
            if creds.ca_bundle:  # per request: REQUESTS_CA_BUNDLE would beat session.verify
                kwargs.setdefault("verify", creds.ca_bundle)
            return super().request(*args, **kwargs)

    session = _TimeoutSession()
    if creds.token:
        session.headers["Authorization"] = f"Bearer {creds.token}"
    elif creds.username:
        session.auth = (creds.username, creds.password)
    session.hooks["response"].append(counter.hook)
    session.hooks["response"].append(_refuse_redirects)
    return session


def _refuse_redirects(response: Any, *args: Any, **kwargs: Any) -> None:
    if 300 <= int(response.status_code) < 400:
        raise SlideStoreError(
            f"the DICOMweb server answered HTTP {response.status_code} (a redirect); "
            "redirects are not followed: configure the URL of the PACS itself",
            status=int(response.status_code))


def _web_client(server: str, creds: DicomWebCredentials, counter: _Counter) -> Any:
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(server, session=_session(creds, counter),
                            timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S))
    # Its default backs off for ~30 s on a refused connection; a PACS that is down should
    # say so within a couple of seconds (a busy one, 429/503, is still retried).
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
    return client


@contextlib.contextmanager
def pacs_errors(what: str) -> Iterator[None]:
    """Translate requests / wsidicom failures into this library's errors."""
    import requests
    from wsidicom.errors import WsiDicomNotFoundError

    try:
        yield
    except WsiSamplerError:
        raise
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 502
        raise store_status_error(
            what, status, store="the DICOMweb server", credentials_hint="set "
            "WSI_DICOMWEB_TOKEN or WSI_DICOMWEB_USERNAME/WSI_DICOMWEB_PASSWORD") from exc
    except requests.exceptions.SSLError as exc:
        raise SlideStoreError(
            f"{what}: the DICOMweb server's TLS certificate could not be verified; trust its "
            "CA with WSI_DICOMWEB_CA_BUNDLE (or dicomweb_ca_bundle)") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise SlideStoreUnavailableError(
            f"{what}: the DICOMweb server could not be reached or broke off "
            f"({type(exc).__name__})") from exc
    except WsiDicomNotFoundError as exc:
        raise SlideNotFoundError(
            f"{what}: no whole-slide (VL WSI) images in this series "
            f"({describe_backend_error(exc)})") from exc
    except requests.RequestException as exc:
        raise SlideStoreUnavailableError(
            f"{what}: the DICOMweb request failed ({type(exc).__name__})") from exc


@dataclass
class _OpenSeries:
    wsi: Any
    counter: _Counter
    opened_at: float


_open_lock = threading.Lock()
_open_series: OrderedDict[tuple[str, ...], _OpenSeries] = OrderedDict()


def _open_series_cached(location: SlideLocation, creds: DicomWebCredentials) -> _OpenSeries:
    """The opened series, from the LRU when it was opened in the last few minutes."""
    key = (location.server, location.study, location.series, creds.identity())
    now = time.monotonic()
    with _open_lock:
        hit = _open_series.get(key)
        if hit is not None and now - hit.opened_at < _OPEN_CACHE_TTL_S:
            _open_series.move_to_end(key)
            return hit
    from wsidicom import WsiDicom, WsiDicomWebClient

    counter = _Counter()
    client = WsiDicomWebClient(_web_client(location.server, creds, counter))
    with pacs_errors(location.url):
        wsi = WsiDicom.open_web(client, location.study, location.series)
    opened = _OpenSeries(wsi, counter, now)
    with _open_lock:
        _open_series[key] = opened
        while len(_open_series) > _OPEN_CACHE_SIZE:
            _open_series.popitem(last=False)
    return opened


def forget_open_series() -> None:
    """Drop every cached open series (the next open reads its metadata again)."""
    with _open_lock:
        _open_series.clear()


def open_dicomweb(
    location: SlideLocation, creds: DicomWebCredentials | None = None
) -> tuple[DicomWebOrigin, DicomWebReader]:
    """Open one DICOM-WSI series of a DICOMweb server: its origin and reader."""
    if not (location.study and location.series):
        raise SlideNotFoundError(
            f"{location.url}: names a DICOMweb server, not a slide (add "
            "/studies/<study UID>/series/<series UID>)")
    opened = _open_series_cached(location, creds or DicomWebCredentials.from_env())
    reader = DicomWebReader(location.url, opened.wsi)
    return DicomWebOrigin(location, opened, reader), reader


class DicomWebReader:
    """The slide reader interface over a wsidicom series (pixels through wsidicom)."""

    backend: Backend = "wsidicom"

    def __init__(self, url: str, wsi: Any) -> None:
        self._url = url
        self._wsi = wsi
        self.levels: list[Any] = list(wsi.levels)
        if not self.levels:
            raise UnsupportedFormatError(f"{url}: the series holds no pyramid level")
        base_w, base_h = self.levels[0].size.width, self.levels[0].size.height
        self.dimensions = (int(base_w), int(base_h))
        self.level_dimensions = tuple(
            (int(lv.size.width), int(lv.size.height)) for lv in self.levels)
        self.level_downsamples = tuple(
            (base_w / w + base_h / h) / 2 for w, h in self.level_dimensions)
        self.properties: Mapping[str, str] = self._properties()
        names = [("label", wsi.labels), ("macro", wsi.overviews)]
        self.associated_names = tuple(name for name, group in names if group)

    def _properties(self) -> dict[str, str]:
        props = {"wsidicom.study-uid": str(self.levels[0].uids.study_instance),
                 "wsidicom.series-uid": str(self.levels[0].uids.series_instance)}
        mpp = self.levels[0].mpp
        if mpp is not None:
            props["wsidicom.mpp-x"] = str(float(mpp.width))
            props["wsidicom.mpp-y"] = str(float(mpp.height))
        return props

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> RGBImage:
        ds = self.level_downsamples[level]
        location = (int(np.floor(x0 / ds)), int(np.floor(y0 / ds)))
        with _read_errors(self._url, "reading a region"):
            region = self._wsi.read_region(location, self.levels[level].level,
                                           (width, height), as_array=True)
        return to_rgb(region)

    def associated(self, name: str) -> RGBImage:
        with _read_errors(self._url, f"reading the {name} image"):
            image = (self._wsi.read_label(as_array=True) if name == "label"
                     else self._wsi.read_overview(as_array=True))
        return to_rgb(image)

    def tiff_resolution(self) -> tuple[float, float, str] | None:
        return None

    def close(self) -> None:
        """The series stays open in the shared LRU for the next reader."""


@contextlib.contextmanager
def _read_errors(url: str, what: str) -> Iterator[None]:
    with pacs_errors(url):
        try:
            yield
        except WsiSamplerError:
            raise
        except Exception as exc:
            import requests

            if isinstance(exc, requests.RequestException):
                raise
            raise CorruptSlideError(
                f"{url}: {what} failed, the series looks damaged "
                f"({describe_backend_error(exc)})") from exc


class FrameFetch:
    """Encoded frames of JPEG levels, fetched through WADO-RS in batches."""

    remote = True
    # Frames per multipart request. A PACS reads (Orthanc: parses) the instance for each
    # request, so a request costs about the same for 1 or 64 frames (~0.3 s for a 60 MB
    # instance on Orthanc 1.10): 64 per request made the benchmark grid 3.6x faster than 16.
    batch = 64

    def __init__(self, url: str, image_data: dict[int, Any]) -> None:
        self._url = url
        self._image_data = image_data

    def fetch(self, level: int, lv: TileLevel, indices: Sequence[int]) -> list[bytes]:
        from wsidicom.geometry import Point

        data = self._image_data[level]
        points = [Point(i % lv.tiles_across, i // lv.tiles_across) for i in indices]
        with pacs_errors(self._url):
            return [bytes(b) for b in data.get_encoded_tiles(points, data.default_z,
                                                             data.default_path)]

    def close(self) -> None:
        """The frames' connection pool belongs to the shared open series."""


def _tile_level(lv: Any) -> tuple[TileLevel, Any] | None:
    data = lv.default_instance.image_data
    colorspace = _COLORSPACES.get(str(data.photometric_interpretation))
    if str(data.transfer_syntax) not in _JPEG_SYNTAXES or colorspace is None:
        return None
    if data.samples_per_pixel != 3 or data.bits != 8 or len(lv.instances) != 1:
        return None
    empty = np.zeros(0, np.int64)
    tile = TileLevel(
        width=int(lv.size.width), height=int(lv.size.height),
        tile_w=int(lv.tile_size.width), tile_h=int(lv.tile_size.height),
        offsets=empty, bytecounts=empty, jpeg_tables=None, jpeg_colorspace=colorspace,
        jpeg_outcolorspace=_JCS_RGB, is_jpeg=True, decode=_no_segment_decoder)
    return tile, data


def _no_segment_decoder(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("DICOM JPEG frames are decoded as JPEG, never as TIFF segments")


class DicomWebOrigin:
    """The origin of a DICOMweb series: tiles as frames, fingerprint from its UIDs."""

    path: Path | None = None

    def __init__(self, location: SlideLocation, opened: _OpenSeries,
                 reader: DicomWebReader) -> None:
        self.location = location.url
        self.name = location.series
        self._opened = opened
        self._reader = reader
        self._start = opened.counter.snapshot()

    def open_tiles(self, level_dimensions: tuple[tuple[int, int], ...]) -> TileSource | None:
        levels: dict[int, TileLevel] = {}
        image_data: dict[int, Any] = {}
        for index, lv in enumerate(self._reader.levels):
            served = _tile_level(lv)
            if served is not None:
                levels[index], image_data[index] = served
        if not levels:
            return None
        return TileSource(self.location, levels, FrameFetch(self.location, image_data))

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over the study, series and instance UIDs of the series."""
        uids = sorted(str(uid) for lv in self._reader.levels for uid in lv.instances)
        first = self._reader.levels[0].uids
        text = "\0".join([str(first.study_instance), str(first.series_instance), *uids])
        return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"

    def io_stats(self) -> dict[str, int] | None:
        """Requests and response bytes since this slide was opened (approximate when
        other readers share the open series at the same time)."""
        requests, fetched = self._opened.counter.snapshot()
        return {"requests": requests - self._start[0], "bytes_fetched": fetched - self._start[1]}

    def close(self) -> None:
        """The series stays open in the shared LRU."""


@dataclass(frozen=True)
class RemoteSeries:
    """A slide found on a DICOMweb server."""

    location: str
    relpath: str
    name: str


def list_series(
    server_url: str, creds: DicomWebCredentials | None = None
) -> list[RemoteSeries]:
    """Every slide-microscopy (``Modality=SM``) series of a DICOMweb server, page by page."""
    from .location import parse_location

    root = parse_location(server_url)
    if root.kind != "dicomweb" or root.study:
        raise SlideNotFoundError(f"{server_url}: not a DICOMweb server URL (dicomweb://…)")
    client = _web_client(root.server, creds or DicomWebCredentials.from_env(), _Counter())
    found: list[RemoteSeries] = []
    offset = 0
    while True:
        with pacs_errors(server_url):
            page = client.search_for_series(
                search_filters={"Modality": "SM"}, limit=_QIDO_PAGE, offset=offset,
                fields=["SeriesDescription"])
        if not isinstance(page, list):
            raise _not_qido(server_url, "not a list of series")
        found.extend(_series_entry(server_url, row) for row in page)
        if len(page) < _QIDO_PAGE:
            return found
        offset += len(page)


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _not_qido(server_url: str, what: str) -> SlideStoreError:
    return SlideStoreError(f"{public_url(server_url)}: the server's series search answer is "
                           f"not a QIDO-RS answer ({what}); is it a DICOMweb server?")


def _series_entry(server_url: str, row: Any) -> RemoteSeries:
    def value(tag: str) -> str:
        entry = row.get(tag) if isinstance(row, Mapping) else None
        values = (entry.get("Value") if isinstance(entry, Mapping) else None) or [""]
        return str(values[0])

    study, series = value("0020000D"), value("0020000E")
    for uid in (study, series):
        if not (_UID.match(uid) and len(uid) <= 64):
            raise _not_qido(server_url, "a series without valid Study and Series Instance "
                                        "UIDs")
    rel = f"studies/{study}/series/{series}"
    return RemoteSeries(f"{server_url.rstrip('/')}/{rel}", rel,
                        value("0008103E") or series)
