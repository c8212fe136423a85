"""Byte ranges of a file on an HTTP(S) server or in S3, read through fsspec.

Only what is asked for is fetched: tile reads become HTTP Range / S3 ranged GETs, and
neighbouring ranges are coalesced into one request when the gap between them is small.
TIFF metadata is parsed through :class:`RangedFile`, a seekable file object over a
bounded block cache. Every request and byte is counted (:attr:`RangedBytes.stats`), so a
caller can see that a plan fetched its tiles and not the slide.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from .._tiles import TileLevel, tile_range
from ..errors import (
    SlideNotFoundError,
    SlideStoreError,
    SlideStoreUnavailableError,
    WsiSamplerError,
    describe_backend_error,
    store_status_error,
)
from .location import SlideLocation
from .origin import FINGERPRINT_BYTES, fingerprint_of

__all__ = [
    "BlockCache", "RangeFetch", "RangedBytes", "RangedFile", "coalesce", "open_filesystem",
    "store_errors",
]

# Two ranges closer than this are fetched as one (a few KiB of waste beats a round trip).
_COALESCE_GAP = 8 << 10
_MAX_REQUEST_BYTES = 16 << 20
_BLOCK = 64 << 10
_BLOCK_CACHE_BLOCKS = 256  # 16 MiB of metadata blocks per open slide
_CONNECT_TIMEOUT_S = 10.0
_READ_TIMEOUT_S = 60.0


def coalesce(
    ranges: Sequence[tuple[int, int]], gap: int = _COALESCE_GAP,
    max_bytes: int = _MAX_REQUEST_BYTES,
) -> list[tuple[int, int]]:
    """Merge (start, end) ranges that overlap or lie within ``gap`` bytes, in file order."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start - merged[-1][1] <= gap and end - merged[-1][0] <= max_bytes:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def open_filesystem(protocol: str) -> Any:
    """An fsspec filesystem for ``s3`` or ``http(s)`` with this library's timeouts."""
    import fsspec

    if protocol == "s3":
        options: dict[str, Any] = {"config_kwargs": {
            "connect_timeout": _CONNECT_TIMEOUT_S, "read_timeout": _READ_TIMEOUT_S,
            "retries": {"max_attempts": 3, "mode": "standard"}}}
        # botocore reads the endpoint from the environment itself; naming it here also keys
        # fsspec's cache of filesystems, so a changed endpoint gets a new client.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    else:
        import aiohttp

        options = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(
            sock_connect=_CONNECT_TIMEOUT_S, sock_read=_READ_TIMEOUT_S)}}
        cafile = os.environ.get("WSI_HTTP_CA_BUNDLE", "")
        if cafile:  # certificates are always verified; this adds a private CA
            options["ssl"] = _tls_context(cafile)
    return fsspec.filesystem(protocol, **options)


@functools.lru_cache(maxsize=4)
def _tls_context(cafile: str) -> ssl.SSLContext:
    # One context per CA file, so fsspec's filesystem cache keeps one client per CA.
    return ssl.create_default_context(cafile=cafile)


def _filesystem(location: SlideLocation) -> tuple[Any, str]:
    protocol = "s3" if location.kind == "s3" else location.url.split("://", 1)[0].lower()
    fs = open_filesystem(protocol)
    path = location.url[len("s3://"):] if protocol == "s3" else location.url
    return fs, path


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Translate fsspec / aiohttp / botocore failures into this library's errors."""
    try:
        yield
    except WsiSamplerError:
        raise
    except FileNotFoundError as exc:
        cause = exc.__cause__  # fsspec's HTTP says "not found" for any failed HEAD/GET
        status = getattr(cause, "status", None)
        if cause is None or status == 404 or isinstance(cause, FileNotFoundError):
            raise SlideNotFoundError(f"{what}: not found on the server") from exc
        with store_errors(what):
            raise cause from exc
    except PermissionError as exc:
        raise SlideStoreError(
            f"{what}: access denied by the store; check the credentials "
            f"({describe_backend_error(exc)})", status=403) from exc
    except Exception as exc:
        if _is_tls_failure(exc):
            raise SlideStoreError(
                f"{what}: the server's TLS certificate could not be verified "
                f"({describe_backend_error(exc)}); trust its CA with WSI_HTTP_CA_BUNDLE "
                "(HTTPS) or AWS_CA_BUNDLE (S3)") from exc
        status = getattr(exc, "status", None) or getattr(exc, "code", None) \
            or _s3_status(exc)
        if isinstance(status, int) and status >= 400:
            raise store_status_error(what, status) from exc
        raise SlideStoreUnavailableError(
            f"{what}: the slide store could not be reached or broke off "
            f"({describe_backend_error(exc)})") from exc


def _is_tls_failure(exc: BaseException | None) -> bool:
    seen: set[int] = set()  # a re-raised cause makes the chain a cycle
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ssl.SSLCertVerificationError) or \
                type(exc).__name__ == "ClientConnectorCertificateError":
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


_S3_CODES = {"NoSuchBucket": 404, "NoSuchKey": 404, "NotFound": 404, "AccessDenied": 403,
             "InvalidAccessKeyId": 403, "SignatureDoesNotMatch": 403, "ExpiredToken": 403}


def _s3_status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError (``NoSuchBucket`` is a 404)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _S3_CODES.get(code) or (status if isinstance(status, int) else None)


class RangedBytes:
    """Ranged reads of one remote file; thread-safe; counts requests and bytes."""

    def __init__(self, location: SlideLocation) -> None:
        self.location = location
        self.url = location.url
        with store_errors(self.url):
            self._fs, self._path = _filesystem(location)
            info = self._fs.info(self._path)
        if info.get("type") == "directory":
            raise SlideNotFoundError(f"{self.url}: a folder, not a slide file")
        self.size = int(info.get("size") or 0)
        if self.size <= 0:
            raise SlideStoreError(
                f"{self.url}: the server does not report the file's size (HTTP Range reads "
                "need Content-Length)")
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_fetched = 0
        self._fingerprint: str | None = None

    @property
    def stats(self) -> dict[str, int]:
        """Requests made and bytes fetched so far (metadata and tiles)."""
        with self._lock:
            return {"requests": self.requests, "bytes_fetched": self.bytes_fetched}

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (start, end) range, fetched in as few requests as sensible."""
        for start, end in ranges:
            if start < 0 or end > self.size or end < start:
                raise ValueError(f"bytes {start}..{end} lie outside the file ({self.size})")
        merged = coalesce(ranges)
        if not merged:
            return [b"" for _ in ranges]
        with store_errors(self.url):
            blobs = self._fs.cat_ranges([self._path] * len(merged),
                                        [s for s, _ in merged], [e for _, e in merged])
        for blob in blobs:
            if isinstance(blob, BaseException):
                with store_errors(self.url):
                    raise blob
        with self._lock:
            self.requests += len(merged)
            self.bytes_fetched += sum(len(b) for b in blobs)
        return [_slice(merged, blobs, start, end) for start, end in ranges]

    def read(self, start: int, end: int) -> bytes:
        return self.read_ranges([(start, end)])[0]

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over the size and first MiB: equal to the local file's."""
        if self._fingerprint is None:
            head = self.read(0, min(self.size, FINGERPRINT_BYTES))
            self._fingerprint = fingerprint_of(self.size, head)
        return self._fingerprint


def _slice(merged: list[tuple[int, int]], blobs: Sequence[bytes], start: int, end: int
           ) -> bytes:
    for (m_start, m_end), blob in zip(merged, blobs, strict=True):
        if m_start <= start and end <= m_end:
            data = blob[start - m_start : end - m_start]
            if len(data) != end - start:
                raise SlideStoreUnavailableError(
                    f"short read: {len(data)} of {end - start} bytes (the file changed?)")
            return bytes(data)
    return b""  # an empty range


class RangedFile(io.RawIOBase):
    """A read-only, seekable file over :class:`RangedBytes`, through a bounded block cache.

    For parsers (tifffile) that read headers and tag arrays with many small reads.
    """

    def __init__(self, source: RangedBytes, cache: BlockCache | None = None) -> None:
        super().__init__()
        self._source = source
        self._cache = cache or BlockCache(source)
        self._pos = 0
        self.name = source.url

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._source.size, self._pos + len(view))
        if end <= self._pos:
            return 0
        data = self._cache.read(self._pos, end)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


class BlockCache:
    """An LRU of fixed-size blocks of one remote file, shared by its parsers."""

    def __init__(self, source: RangedBytes, capacity: int = _BLOCK_CACHE_BLOCKS) -> None:
        self._source = source
        self._capacity = capacity
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, start: int, end: int) -> bytes:
        first, last = start // _BLOCK, (end - 1) // _BLOCK
        with self._lock:
            missing = [b for b in range(first, last + 1) if b not in self._blocks]
        if missing:
            fetched = self._source.read_ranges(
                [(b * _BLOCK, min((b + 1) * _BLOCK, self._source.size)) for b in missing])
            with self._lock:
                for b, data in zip(missing, fetched, strict=True):
                    self._blocks[b] = data
        with self._lock:
            parts = []
            for b in range(first, last + 1):
                block = self._blocks.get(b)
                if block is None:  # evicted between the two locks: fetch it alone
                    block = self._source.read(b * _BLOCK, min((b + 1) * _BLOCK,
                                                              self._source.size))
                self._blocks[b] = block
                self._blocks.move_to_end(b)
                parts.append(block)
            while len(self._blocks) > max(self._capacity, last - first + 1):
                self._blocks.popitem(last=False)
        joined = b"".join(parts)
        offset = start - first * _BLOCK
        return joined[offset : offset + end - start]


class RangeFetch:
    """Stored TIFF tiles of a remote file: one ranged request per run of near tiles."""

    remote = True
    batch = 16  # ranges per request batch (neighbours among them are coalesced)

    def __init__(self, source: RangedBytes) -> None:
        self._source = source

    def fetch(self, level: int, lv: TileLevel, indices: Sequence[int]) -> list[bytes]:
        spans = [tile_range(lv, index, self._source.size) for index in indices]
        return self._source.read_ranges([(offset, offset + count) for offset, count in spans])

    def close(self) -> None:
        """Nothing to release: fsspec keeps its own connection pool."""
