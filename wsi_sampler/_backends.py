"""Thin adapters over openslide-python and tiffslide with one private interface.

Every backend exception is translated here, once, into :mod:`wsi_sampler.errors`.
Coordinates are level-0 pixels; sizes passed to ``read`` are pixels of the read level.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from ._tiff_integrity import check_tiff_integrity
from .errors import (
    CorruptSlideError,
    UnsupportedFormatError,
    WsiSamplerError,
    describe_backend_error,
)
from .types import Backend, RGBImage

__all__ = ["Reader", "open_reader", "open_tiff_reader", "to_rgb"]

# A damaged file makes the backends fail in every way Python can (struct.error for a 4-byte
# file, ZeroDivisionError for ImageWidth=0, TypeError for flipped IFD bytes, IndexError,
# OverflowError...). Whatever a backend raises while parsing or decoding the bytes of a file
# is a property of that file, so all of it is translated here, at the boundary.
_DATA_ERRORS: tuple[type[BaseException], ...] = (Exception,)


class Reader(Protocol):
    backend: Backend
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]
    associated_names: tuple[str, ...]

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> RGBImage: ...

    def associated(self, name: str) -> RGBImage: ...

    def tiff_resolution(self) -> tuple[float, float, str] | None: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def _translated(path: str, what: str) -> Iterator[None]:
    """Turn any backend failure during ``what`` into a CorruptSlideError."""
    try:
        yield
    except WsiSamplerError:
        raise
    except _DATA_ERRORS as exc:
        raise CorruptSlideError(
            f"{path}: {what} failed, the file looks damaged ({describe_backend_error(exc)})"
        ) from exc


def to_rgb(arr: Any) -> RGBImage:
    """Return an (H, W, 3) uint8 array; transparent pixels are composited on white."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4]
        rgb = a[:, :, :3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb, dtype=np.uint8)
        blended = rgb.astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16))
        composited: RGBImage = (blended // 255).astype(np.uint8)
        return composited
    out: RGBImage = np.ascontiguousarray(a[:, :, :3], dtype=np.uint8)
    return out


class _Attrs:
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]
    associated_names: tuple[str, ...]


class _OpenSlideReader(_Attrs):
    backend: Backend = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        self._path = path
        self._os = openslide.OpenSlide(path)
        w, h = self._os.dimensions
        self.dimensions = (int(w), int(h))
        self.level_dimensions = tuple((int(a), int(b)) for a, b in self._os.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._os.level_downsamples)
        self.properties = dict(self._os.properties)
        self.associated_names = tuple(self._os.associated_images.keys())

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> RGBImage:
        with _translated(self._path, "reading a region"):
            region = self._os.read_region((x0, y0), level, (width, height))
            return to_rgb(region)

    def associated(self, name: str) -> RGBImage:
        with _translated(self._path, f"reading the {name} image"):
            return to_rgb(self._os.associated_images[name])

    def tiff_resolution(self) -> tuple[float, float, str] | None:
        p = self.properties
        try:
            return (float(p["tiff.XResolution"]), float(p["tiff.YResolution"]),
                    p.get("tiff.ResolutionUnit", "inch"))
        except (KeyError, ValueError):
            return None

    def close(self) -> None:
        self._os.close()


class _TiffSlideReader(_Attrs):
    backend: Backend = "tiffslide"

    def __init__(self, path: str, fh: BinaryIO | None = None) -> None:
        import tiffslide

        self._path = path
        # Own the file handle: tiffslide leaks its own when opening fails. A remote slide
        # comes as a file object over ranged reads.
        self._fh = fh if fh is not None else open(path, "rb")  # noqa: SIM115 - closed below
        try:
            self._load(tiffslide)
        except BaseException:
            self._fh.close()
            raise

    def _load(self, tiffslide: Any) -> None:
        with warnings.catch_warnings():
            # tiffslide warns that it parses NDPI metadata partially; MPP is still read.
            warnings.simplefilter("ignore", UserWarning)
            self._ts = tiffslide.TiffSlide(self._fh)
            props = self._ts.properties
        try:
            check_tiff_integrity(self._ts.ts_tifffile, self._file_size(), self._path)
        except BaseException:
            self._ts.close()
            raise
        # tiffslide shares one file handle between threads; serialise its reads.
        self._lock = threading.Lock()
        w, h = self._ts.dimensions
        self.dimensions = (int(w), int(h))
        self.level_dimensions = tuple(
            (int(w), int(h)) for w, h in self._ts.level_dimensions
        )
        self.level_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        self.properties = {k: str(v) for k, v in props.items() if v is not None}
        self.associated_names = tuple(self._ts.associated_images.keys())

    def _file_size(self) -> int:
        at = self._fh.tell()
        try:
            return int(self._fh.seek(0, os.SEEK_END))
        finally:
            self._fh.seek(at)

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> RGBImage:
        with _translated(self._path, "reading a region"), self._lock:
            arr = self._ts.read_region((x0, y0), level, (width, height), as_array=True)
            return to_rgb(arr)

    def associated(self, name: str) -> RGBImage:
        with _translated(self._path, f"reading the {name} image"), self._lock:
            return to_rgb(self._ts.associated_images[name])

    def tiff_resolution(self) -> tuple[float, float, str] | None:
        """(x, y, unit) from the first page's resolution tags; None if absent or unusable."""
        try:
            tags = self._ts.ts_tifffile.pages.first.tags
            xr = tags["XResolution"].value
            yr = tags["YResolution"].value
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
            unit_name = {1: "none", 2: "inch", 3: "centimeter"}.get(int(unit), "none")
            return (xr[0] / xr[1], yr[0] / yr[1], unit_name)
        except Exception:  # absent, or damaged tags (a zero denominator): no MPP from them
            return None

    def close(self) -> None:
        self._ts.close()
        self._fh.close()


def _open_openslide(path: str) -> Reader:
    import openslide

    try:
        return _OpenSlideReader(path)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise UnsupportedFormatError(f"{path}: openslide does not recognise this file") from exc
    except _DATA_ERRORS as exc:
        raise CorruptSlideError(
            f"{path}: the file is damaged or truncated; openslide could not open it "
            f"({describe_backend_error(exc)})"
        ) from exc


def _open_tiffslide(path: str, fh: BinaryIO | None = None) -> Reader:
    import tifffile

    try:
        return _TiffSlideReader(path, fh)
    except tifffile.TiffFileError as exc:
        raise UnsupportedFormatError(
            f"{path}: not a TIFF-based slide ({describe_backend_error(exc)})"
        ) from exc
    except WsiSamplerError:
        raise
    except _DATA_ERRORS as exc:
        raise CorruptSlideError(
            f"{path}: the file is damaged or truncated; tiffslide could not open it "
            f"({describe_backend_error(exc)})"
        ) from exc


def open_tiff_reader(name: str, fh: BinaryIO) -> Reader:
    """Open a TIFF-based slide (SVS, generic pyramidal TIFF) from a seekable file object."""
    return _open_tiffslide(name, fh)


def open_reader(path: Path, backend: str) -> Reader:
    """Open ``path`` with the named backend, or openslide then tiffslide for ``auto``."""
    target = str(path)
    if backend == "openslide":
        return _open_openslide(target)
    if backend == "tiffslide":
        return _open_tiffslide(target)
    try:
        return _open_openslide(target)
    except (UnsupportedFormatError, CorruptSlideError) as os_exc:
        try:
            return _open_tiffslide(target)
        except WsiSamplerError as ts_exc:
            if isinstance(os_exc, CorruptSlideError):
                raise os_exc from ts_exc
            if isinstance(ts_exc, CorruptSlideError):
                raise ts_exc from os_exc
            raise UnsupportedFormatError(
                f"{target}: not a supported whole-slide image (openslide: unsupported; "
                f"tiffslide: {ts_exc})"
            ) from ts_exc
