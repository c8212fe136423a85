"""Domain errors -> HTTP, in one place. Routes raise library errors, never HTTPException."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from wsi_sampler.errors import (
    CorruptSlideError,
    InvalidRequestError,
    MissingMppError,
    ModelLoadError,
    SlideNotFoundError,
    SlideStoreError,
    SlideStoreUnavailableError,
    StorageFullError,
    UnsupportedFormatError,
    WorkerError,
    WorkerUnavailableError,
    WsiSamplerError,
)
from wsi_sampler.redact import redact

from .jobs import JobNotFoundError, JobQuotaError
from .slides import NotDeletableError, UploadTooLargeError
from .uploads import MalformedBodyError

__all__ = [
    "MessageScrubber",
    "TooBusyError",
    "UnauthorizedError",
    "WorkerNotReadyError",
    "describe_error",
    "install_error_handlers",
]

logger = logging.getLogger("wsi_sampler.api")


class TooBusyError(WsiSamplerError):
    """Too many concurrent streams (HTTP 429, Retry-After)."""


class UnauthorizedError(WsiSamplerError):
    """Missing or wrong API key (HTTP 401)."""


class WorkerNotReadyError(WsiSamplerError):
    """The model worker is not (yet) available (HTTP 503, Retry-After)."""


class ViewerAssetsMissingError(WsiSamplerError):
    """The viewer's browser files are not installed (HTTP 503)."""


# Most specific first: the first matching class decides the status.
STATUS: list[tuple[type[BaseException], int]] = [
    (MalformedBodyError, 400),
    (UnauthorizedError, 401),
    (SlideNotFoundError, 404),
    (JobNotFoundError, 404),
    (NotDeletableError, 405),
    (UploadTooLargeError, 413),
    (MissingMppError, 422),
    (UnsupportedFormatError, 422),
    (StorageFullError, 507),
    (CorruptSlideError, 422),
    (InvalidRequestError, 422),
    (TooBusyError, 429),
    (JobQuotaError, 429),
    (WorkerUnavailableError, 503),
    (SlideStoreUnavailableError, 503),
    (SlideStoreError, 502),
    (WorkerNotReadyError, 503),
    (ViewerAssetsMissingError, 503),
    (WorkerError, 502),
    (ModelLoadError, 503),
]


def status_for(exc: BaseException) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


class MessageScrubber:
    """Makes a message safe to answer: the server's own folders removed (a slide is named
    by its path relative to its root, as listed, never by where the server keeps it) and
    secrets masked (:func:`wsi_sampler.redact.redact`).

    Only whole paths are scrubbed: a folder followed by ``/`` loses that prefix; a bare
    folder name becomes ``<slide root>`` only when it is absolute or a URL, so the default
    ``data`` folder leaves the words "metadata" and "data" alone."""

    def __init__(self, folders: list[Path], urls: list[str] | None = None, *,
                 whole_paths: bool = False) -> None:
        names = {str(f) for f in folders} | {str(f.resolve()) for f in folders}
        names |= {u.rstrip("/") for u in urls or []}  # remote roots: S3 prefix, PACS URL
        self._whole = whole_paths
        """De-identified mode: a path below a root becomes ``<slide>`` (its file name may
        name a patient), not its path in the root."""
        self._patterns = [self._pattern(n) for n in sorted(names, key=len, reverse=True)
                          if n not in ("", ".")]

    def _pattern(self, name: str) -> re.Pattern[str]:
        start = r"(?<![\w.~/-])"  # not inside a longer name or path
        bare = r"(?![\w.-])" if name.startswith("/") or "://" in name else r"(?=/)"
        below = r"[^\s'\"():;,]*" if self._whole else ""
        return re.compile(start + re.escape(name) + r"(?:/(?P<below>" + below + ")|" + bare
                          + ")")

    @staticmethod
    def _replacement(match: re.Match[str]) -> str:
        below = match.group("below")
        if below is None:
            return "<slide root>"  # the folder itself
        return "<slide>" if below else ""  # a path below it: whole, or the root prefix only

    def __call__(self, message: str) -> str:
        for pattern in self._patterns:
            message = pattern.sub(self._replacement, message)
        return redact(message)


def describe_error(exc: BaseException, scrub: MessageScrubber) -> tuple[int, str]:
    """(HTTP status, client-safe message) of an exception; bugs say nothing of themselves."""
    if isinstance(exc, WsiSamplerError):
        return status_for(exc), scrub(str(exc))
    logger.error("internal error", exc_info=exc)
    return 500, "internal error (logged by the server)"


def _scrubber(request: Request) -> MessageScrubber:
    services = getattr(request.app.state, "services", None)
    return services.scrub if services is not None else MessageScrubber([])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(WsiSamplerError)
    async def domain(request: Request, exc: WsiSamplerError) -> JSONResponse:
        status, message = describe_error(exc, _scrubber(request))
        wait = "30" if isinstance(exc, JobQuotaError) else "2"  # a job slot frees slowly
        headers = {"Retry-After": wait} if status in (429, 503) else {}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if status >= 500:
            logger.warning("%s: %s", type(exc).__name__, message)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        status, message = describe_error(exc, _scrubber(request))
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg"))} for e in exc.errors()]
        first = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail[:3])
        return JSONResponse({"error": f"invalid request: {first}", "detail": detail},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of the path, not only the first route's
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """The methods that some route serves at this request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)
