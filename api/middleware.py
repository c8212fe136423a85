"""Pure ASGI middleware: what must happen before a route reads a single body byte.

- ``RequestGuard``: the API key of every ``/v1`` call and the size of every request body
  are checked before the body is read (a declared size over the limit is refused at once;
  an undeclared one is counted as it arrives and refused the moment it passes the limit),
  so an unauthenticated or oversized request costs neither disk nor memory.
- ``RequestMetrics``: counts requests by route and status.

Both pass streamed responses through untouched: a stream that the app aborts reaches the
client aborted (Starlette's ``BaseHTTPMiddleware`` would end it cleanly instead).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .jobs import owner_of
from .metrics import Metrics

__all__ = ["RequestGuard", "RequestMetrics", "UPLOAD_PATH"]

UPLOAD_PATH = "/v1/slides"
_MULTIPART_FRAMING = 64 * 1024


async def send_json_error(send: Send, status: int, message: str,
                          headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """API keys on ``/v1`` and body size limits, enforced before the body is read."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keys = [k.get_secret_value().encode() for k in settings.api_keys]
        self.upload_limit = int(settings.max_upload_mb * 2**20)
        self.upload_mb = settings.max_upload_mb
        self.body_limit = int(settings.max_body_kb * 1024)

    def _limit(self, scope: Scope) -> tuple[int, str]:
        if scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH:
            return self.upload_limit + _MULTIPART_FRAMING, f"{self.upload_mb:g} MiB upload"
        return self.body_limit, f"{self.body_limit // 1024} KiB request body"

    def _auth_error(self, headers: Headers) -> str | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "this service needs an API key: Authorization: Bearer <key>"
        if not any(hmac.compare_digest(token.encode(), key) for key in self.keys):
            return "the API key is not valid"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.keys and scope["path"].startswith("/v1"):
            problem = self._auth_error(headers)
            if problem is not None:
                await send_json_error(send, 401, problem, {"WWW-Authenticate": "Bearer"})
                return
            token = headers.get("authorization", "").partition(" ")[2]
            scope.setdefault("state", {})["owner"] = owner_of(token)  # whose jobs these are
        limit, what = self._limit(scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await send_json_error(send, 413, f"the request exceeds the limit of a {what}")
            return
        await self._guarded(scope, receive, send, limit, what)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, limit: int,
                       what: str) -> None:
        state = {"received": 0, "over": False, "started": False}

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise _BodyTooLarge
            return message

        async def checked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state["over"]:  # whatever the app made of the cut body, it is a 413
                    raise _BodyTooLarge
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, checked_send)
        except _BodyTooLarge:
            if not state["started"]:
                await send_json_error(send, 413, f"the request exceeds the limit of a {what}")
        except Exception:
            if not state["over"] or state["started"]:
                raise
            await send_json_error(send, 413, f"the request exceeds the limit of a {what}")


class RequestMetrics:
    """Counts requests by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            metrics = self.metrics()
            if metrics is not None:
                route = getattr(scope.get("route"), "path", "unmatched")
                metrics.requests.labels(scope["method"], route, str(status["code"])).inc()
