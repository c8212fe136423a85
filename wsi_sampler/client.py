"""Read a wsi-sampler service's patch stream into numpy arrays, on another machine.

``stream_patches`` posts a plan to ``/v1/slides/{id}/patches`` and yields ``(meta, image)``
per patch as the WebDataset tar arrives: ``meta`` is the patch's JSON member (index, level-0
``x0``/``y0``, ``tissue_fraction``…), ``image`` an (H, W, 3) uint8 RGB array. With
``image_format="raw"`` (the default) each ``.npy`` member is read from the socket straight
into its array: no decoding and no copy in Python, the form for feeding a model; ``png``
and ``jpeg`` members are decoded.

Only the standard library's HTTP client (``http.client``): it reads a response into a
caller's buffer, where httpx and requests hand out new ``bytes`` for every piece (~6x the
client's CPU for a raw stream, ``python -m benchmarks.api``).

Failures are never silent: an error status raises :class:`PatchStreamError` with the
service's message; a stream that breaks off (the service aborts a stream that fails after
it started: no tar end marker) raises it too, saying how many patches arrived.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import ssl
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlsplit

import imagecodecs
import numpy as np

from .errors import WsiSamplerError
from .types import RGBImage

__all__ = ["PatchStreamError", "stream_patches"]

_BLOCK = 512
_READ = 1 << 20


class PatchStreamError(WsiSamplerError, ConnectionError):
    """The service refused the request, or the stream broke off before its end."""


def _connect(base_url: str, timeout: float, ca_bundle: str | None
             ) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PatchStreamError(f"not an http(s) service URL: {base_url!r}")
    if parts.scheme == "https":  # always verified: the system's CAs, or ca_bundle
        context = ssl.create_default_context(cafile=ca_bundle)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    return conn, parts.path.rstrip("/")


def _error_message(resp: http.client.HTTPResponse) -> str:
    body = resp.read(64 * 1024)
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:300] or resp.reason


class _TarReader:
    """Members of a tar arriving on an HTTP response, read in order."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self._resp = resp
        self._block = bytearray(_BLOCK)

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` from the stream (EOFError if it ends first)."""
        done = 0
        while done < len(view):
            got = self._resp.readinto(view[done : done + _READ])
            if not got:
                raise EOFError
            done += got

    def next_header(self) -> tuple[str, int] | None:
        """(name, size) of the next member; None at the end-of-archive marker."""
        self.read_into(memoryview(self._block))
        if not any(self._block):
            return None
        name = bytes(self._block[0:100]).split(b"\0", 1)[0].decode()
        size = int(bytes(self._block[124:136]).strip(b"\0 ") or b"0", 8)
        return name, size

    def read(self, size: int) -> bytes:
        buf = bytearray(size)
        self.read_into(memoryview(buf))
        return bytes(buf)

    def skip_padding(self, size: int) -> None:
        pad = -size % _BLOCK
        if pad:
            self.read_into(memoryview(self._block)[:pad])


@lru_cache(maxsize=64)
def _npy_shape(header: bytes) -> tuple[int, ...]:
    """The shape a ``.npy`` header announces (a stream repeats one header: parsed once,
    numpy parses it with ``ast.literal_eval``, 2/3 of the client's CPU otherwise)."""
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]))
    if fortran or dtype != np.uint8:
        raise PatchStreamError(f"unexpected .npy member: {shape} {dtype}")
    return tuple(int(n) for n in shape)


def _read_npy(tar: _TarReader, size: int) -> RGBImage:
    """A ``.npy`` member: its header parsed, then its data read into the array itself."""
    head = tar.read(10)
    if head[:6] != b"\x93NUMPY":
        raise PatchStreamError("a .npy member does not start with the numpy magic")
    header_len = int.from_bytes(head[8:10], "little")
    header = head + tar.read(header_len)
    shape = _npy_shape(header)
    if len(header) + math.prod(shape) != size:
        raise PatchStreamError(f"a .npy member of {size} bytes cannot hold {shape}")
    image = np.empty(shape, np.uint8)
    tar.read_into(image.data.cast("B"))
    return image


def _read_image(tar: _TarReader, name: str, size: int) -> RGBImage:
    if name.endswith(".npy"):
        return _read_npy(tar, size)
    data = tar.read(size)
    if name.endswith(".png"):
        return np.asarray(imagecodecs.png_decode(data), dtype=np.uint8)
    return np.asarray(imagecodecs.jpeg8_decode(data), dtype=np.uint8)


def _patches(tar: _TarReader) -> Iterator[tuple[dict[str, Any], RGBImage]]:
    image: RGBImage | None = None
    while (member := tar.next_header()) is not None:
        name, size = member
        if name.endswith(".json"):
            meta = json.loads(tar.read(size))
            tar.skip_padding(size)
            if image is None:
                raise PatchStreamError(f"{name} arrived without its image")
            yield meta, image
            image = None
            continue
        image = _read_image(tar, name, size)
        tar.skip_padding(size)


def _post(
    conn: http.client.HTTPConnection, path: str, body: str, headers: dict[str, str],
    base_url: str,
) -> http.client.HTTPResponse:
    """The response's status line and headers; refusals and unreachable services raised."""
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
    except ssl.SSLCertVerificationError as exc:
        raise PatchStreamError(
            f"{base_url}: its TLS certificate could not be verified ({exc.verify_message}); "
            "pass ca_bundle= with the CA that signed it") from exc
    except (http.client.HTTPException, OSError) as exc:
        raise PatchStreamError(f"{base_url} could not be reached ({exc})") from exc
    if resp.status != 200:
        raise PatchStreamError(f"HTTP {resp.status}: {_error_message(resp)}")
    return resp


def stream_patches(
    base_url: str, slide_id: str, plan: Mapping[str, Any] | None = None, *,
    image_format: str = "raw", api_key: str | None = None, timeout: float = 600.0,
    ca_bundle: str | None = None,
) -> Iterator[tuple[dict[str, Any], RGBImage]]:
    """``(meta, image)`` for every patch of ``plan`` (a ``/patches`` request body, e.g.
    ``{"strategy": "grid", "patch_size_px": 224, "target_mpp": 0.5}``), in plan order.
    ``timeout``: seconds any one read may wait; ``ca_bundle``: a PEM file of the CAs that
    signed an https service's certificate, where the system's do not."""
    conn, prefix = _connect(base_url, timeout, ca_bundle)
    body = json.dumps({**(plan or {}), "image_format": image_format})
    headers = {"Content-Type": "application/json", "Accept": "application/x-tar"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    path = f"{prefix}/v1/slides/{quote(slide_id, safe='')}/patches"
    received = 0
    try:
        resp = _post(conn, path, body, headers, base_url)
        planned = int(resp.headers.get("X-Patch-Count", "-1"))
        try:
            for patch in _patches(_TarReader(resp)):
                received += 1
                yield patch
        except (EOFError, http.client.HTTPException, OSError) as exc:
            if isinstance(exc, PatchStreamError):
                raise
            of = f" of {planned}" if planned >= 0 else ""
            raise PatchStreamError(
                f"the patch stream broke off after {received}{of} patches "
                f"({type(exc).__name__}): the service failed mid-stream or the connection "
                "was lost") from exc
    finally:
        conn.close()
    if planned >= 0 and received != planned:
        raise PatchStreamError(f"the stream ended after {received} of {planned} patches")
