"""Exception hierarchy of wsi-sampler.

Backend errors (openslide, tiffslide, tifffile) are translated into these once, at the
reader boundary in :mod:`wsi_sampler.slide`. Each subclass also inherits the builtin a
caller would naturally catch, so ``except FileNotFoundError`` keeps working.
"""

from __future__ import annotations

import re

__all__ = [
    "CorruptSlideError",
    "EmptyPlanError",
    "InvalidRequestError",
    "MissingMppError",
    "ModelLoadError",
    "ModelNotFoundError",
    "SlideNotFoundError",
    "SlideStoreError",
    "SlideStoreUnavailableError",
    "UnsupportedFormatError",
    "WorkerError",
    "WorkerUnavailableError",
    "WsiSamplerError",
    "describe_backend_error",
    "store_status_error",
]

# A bytes literal in a backend message (tifffile quotes a file's first bytes): never echo
# file content back to a caller.
_BYTES_LITERAL = re.compile(r"""(?<!\w)b(["'])(?:\\.|(?!\1).){0,400}\1""")
_MAX_DETAIL = 200


def describe_backend_error(exc: BaseException) -> str:
    """A short, content-free description of a backend exception for an error message."""
    text = _BYTES_LITERAL.sub("<bytes>", str(exc)).strip() or type(exc).__name__
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 1] + "…"
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, OSError) else text


class WsiSamplerError(Exception):
    """Base class of every error this library raises on purpose."""


class SlideNotFoundError(WsiSamplerError, FileNotFoundError):
    """The slide path does not exist (or is not a readable file or DICOM folder)."""


class SlideStoreError(WsiSamplerError, OSError):
    """A remote slide store (HTTP server, S3, DICOMweb PACS) refused or failed a request.

    Not the caller's mistake: the store rejected the configured credentials, or answered
    with an error. ``status`` is the store's HTTP status where there was one.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SlideStoreUnavailableError(SlideStoreError, ConnectionError):
    """A remote slide store could not be reached (refused, timed out, connection lost)."""


class UnsupportedFormatError(WsiSamplerError, ValueError):
    """The file exists but no backend recognises it as a whole-slide image."""


class CorruptSlideError(WsiSamplerError, OSError):
    """The file looks like a slide but is damaged: zero bytes, truncated, bad tiles."""


class StorageFullError(WsiSamplerError, OSError):
    """No space left where results or uploads are written (HTTP 507)."""


class MissingMppError(WsiSamplerError, ValueError):
    """A physical size was asked of a slide whose microns-per-pixel are unknown."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"{path}: the slide has no microns-per-pixel (MPP) metadata, so physical sizes "
            "cannot be computed; pass mpp_override (CLI: --mpp-override) with the scanner's "
            "resolution in µm/px, e.g. 0.25 for 40x or 0.5 for 20x"
        )
        self.path = path


class InvalidRequestError(WsiSamplerError, ValueError):
    """Parameters that cannot be satisfied (negative sizes, unknown level, bad ROI...)."""


class EmptyPlanError(InvalidRequestError):
    """A plan holds no patch where the caller asked for at least one."""


class ModelNotFoundError(WsiSamplerError, FileNotFoundError):
    """A model, model card or weights file that is not on disk (nothing is downloaded)."""


class ModelLoadError(WsiSamplerError, ValueError):
    """A model that cannot be loaded, or whose real inputs/outputs differ from its card."""


class WorkerError(WsiSamplerError, RuntimeError):
    """A model worker refused or failed a request; ``status`` is its HTTP status if remote."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WorkerUnavailableError(WorkerError, ConnectionError):
    """A remote worker could not be reached, or stayed not ready, after the retries."""


def store_status_error(
    what: str, status: int, *, store: str = "the server", credentials_hint: str = ""
) -> WsiSamplerError:
    """The error for a slide store's HTTP error status: 404 is a missing slide, 401/403
    refused credentials, anything else the store's own failure."""
    if status == 404:
        return SlideNotFoundError(f"{what}: not found on {store}")
    if status in (401, 403):
        hint = f"; {credentials_hint}" if credentials_hint else ""
        return SlideStoreError(f"{what}: {store} refused the credentials (HTTP {status}){hint}",
                               status=status)
    return SlideStoreError(f"{what}: {store} answered HTTP {status}", status=status)
