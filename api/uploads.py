"""Slide uploads, received as a stream and stored by content.

The body (multipart field ``file``, or a raw ``application/octet-stream`` body) is parsed as
it arrives and written straight to a temporary file, with a running byte count (the size
limit itself is enforced by :class:`api.middleware.RequestGuard`, before and while the
bytes arrive) and a running SHA-256. The stored name is that hash plus the extension of
the format found in the content (never the client's file name), so the same bytes sent
twice, under any name, are stored once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from wsi_sampler import open_slide
from wsi_sampler._io import atomic_write_text, process_umask
from wsi_sampler.deidentify import deidentify_file
from wsi_sampler.errors import (
    CorruptSlideError,
    InvalidRequestError,
    UnsupportedFormatError,
    WsiSamplerError,
)

from .slides import SlideEntry, SlideRegistry, name_file

__all__ = ["MalformedBodyError", "ReceivedUpload", "receive_upload", "sniff_format",
           "store_upload"]

_FLUSH_BYTES = 1 << 20
_HEAD_BYTES = 512
# openslide's vendor name -> the extension its files carry (anything else: generic TIFF).
_VENDOR_SUFFIX = {"aperio": ".svs", "hamamatsu": ".ndpi", "leica": ".scn", "ventana": ".bif"}


def sniff_format(head: bytes) -> str | None:
    """The container format from a file's first bytes: ``tiff``, ``dicom`` or None."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


class MalformedBodyError(WsiSamplerError, ValueError):
    """A request body that does not parse as what its Content-Type says (HTTP 400)."""


@dataclass
class ReceivedUpload:
    path: Path
    size: int = 0
    head: bytes = b""
    digest: str = ""
    pending_bytes: int = 0
    filename: str = ""
    """The name the client gave the file (multipart ``filename``, or ``?name=``)."""
    _hash: Any = field(default_factory=hashlib.sha256, repr=False)
    _pending: list[bytes] = field(default_factory=list, repr=False)

    def add(self, data: bytes) -> None:
        self._pending.append(data)
        self.pending_bytes += len(data)
        self.size += len(data)
        if len(self.head) < _HEAD_BYTES:
            self.head += data[: _HEAD_BYTES - len(self.head)]

    def flush_to(self, fh: BinaryIO) -> None:
        """Write and hash what arrived since the last flush (called in a worker thread)."""
        data = b"".join(self._pending)
        self._pending.clear()
        self.pending_bytes = 0
        self._hash.update(data)
        fh.write(data)
        self.digest = self._hash.hexdigest()


class _FilePart:
    """multipart callbacks that keep the data of the first part named ``file``."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self.sink = sink
        self.found = False
        self.filename = ""
        self._in_file = False
        self._field = bytearray()
        self._value = bytearray()
        self._disposition = b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._begin, "on_header_field": self._on_field,
            "on_header_value": self._on_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._disposition = b""

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._field).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._disposition)
        self._in_file = params.get(b"name") == b"file" and not self.found
        if self._in_file:
            self.filename = params.get(b"filename", b"").decode("utf-8", "replace")
        self.found = self.found or self._in_file

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.sink(bytes(data[start:end]))

    def _end(self) -> None:
        self._in_file = False


async def receive_upload(request: Request, tmp: Path) -> ReceivedUpload:
    """Stream the request body's slide into ``tmp``."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    upload = ReceivedUpload(tmp)
    feed: Callable[[bytes], object]
    part: _FilePart | None = None
    if ctype == b"multipart/form-data":
        if b"boundary" not in params:
            raise MalformedBodyError("multipart body without a boundary")
        part = _FilePart(upload.add)
        feed = MultipartParser(params[b"boundary"], cast(Any, part.callbacks())).write
    elif ctype in (b"application/octet-stream", b""):
        feed = upload.add
    else:
        raise InvalidRequestError(
            "send the slide as multipart field 'file' (curl -F file=@slide.svs) or as an "
            "application/octet-stream body"
        )
    with tmp.open("wb") as fh:
        async for chunk in request.stream():
            try:
                feed(chunk)
            except FormParserError as exc:
                raise MalformedBodyError(f"the multipart body does not parse: {exc}") from None
            if upload.pending_bytes >= _FLUSH_BYTES:
                await asyncio.to_thread(upload.flush_to, fh)
        await asyncio.to_thread(upload.flush_to, fh)
    if part is not None and not part.found:
        raise InvalidRequestError("the multipart body has no field named 'file'")
    upload.filename = part.filename if part is not None else request.query_params.get(
        "name", "")
    if upload.size == 0:
        raise CorruptSlideError("the upload is empty (zero bytes)")
    return upload


def temp_upload_path(uploads: Path) -> Path:
    tmp_dir = uploads / ".incoming"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tmp_dir / f"{uuid.uuid4().hex}.part"


def _suffix_from_content(upload: ReceivedUpload) -> str:
    fmt = sniff_format(upload.head)
    if fmt is None:
        raise UnsupportedFormatError(
            "the upload is not a whole-slide image (neither TIFF-based nor DICOM content)"
        )
    if fmt == "dicom":
        raise UnsupportedFormatError(
            "single DICOM files are not accepted as uploads: a DICOM-WSI slide is a folder "
            "of instances; place it under a slide root instead"
        )
    with open_slide(upload.path) as slide:  # corrupt or unsupported content: a clear 422
        slide.thumbnail(max_size=256)  # pixels decode too, not just the header
        vendor = slide.vendor or ""
    return _VENDOR_SUFFIX.get(vendor, ".tiff")


def store_upload(registry: SlideRegistry, uploads: Path, upload: ReceivedUpload) -> SlideEntry:
    """Check a received upload opens as a slide and store it under its content hash."""
    try:
        suffix = _suffix_from_content(upload)
    except WsiSamplerError as exc:  # name it "the upload", not by its temporary path
        exc.args = (str(exc).replace(str(upload.path), "the upload"),)
        raise
    target = uploads.resolve() / f"{upload.digest[:24]}{suffix}"
    if target.exists():  # the same bytes again: stored once, under its first name
        upload.path.unlink(missing_ok=True)
    elif registry.deidentify:  # stored without label, macro and identifying text
        try:
            deidentify_file(upload.path, target)
        except WsiSamplerError as exc:
            exc.args = (str(exc).replace(upload.path.name, "the upload"),)
            raise
        upload.path.unlink(missing_ok=True)
    else:
        os.chmod(upload.path, 0o666 & ~process_umask())
        shutil.move(str(upload.path), str(target))
    name = upload_name(upload.filename)
    if name and not registry.deidentify and not name_file(target).exists():
        atomic_write_text(name_file(target), name)
    return registry.add_upload(uploads, target)


def upload_name(filename: str) -> str:
    """A client's file name as an upload's ``name``: its last path part, printable, short."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    clean = "".join(c for c in base if c.isprintable()).strip()
    return clean[:200] if clean not in ("", ".", "..") else ""

