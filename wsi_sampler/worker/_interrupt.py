"""HTTP calls that another thread can cut short, and a deadline for a whole call.

Closing an httpx client does not wake a thread blocked reading a socket; shutting the
socket down does. :class:`CuttableHttp` remembers the sockets of the connections its client
opens (httpcore's ``trace`` events) so :meth:`CuttableHttp.cut` can shut them down: a
request that waits on a hanging server then fails at once. :class:`Deadline` cuts them
when a whole call (retries included) has run out of time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

import httpx

__all__ = ["CuttableHttp", "Deadline"]

_KEEP = 16  # connections remembered (a client reuses one or two)
_CONNECTED = ("connection.connect_tcp.complete", "connection.start_tls.complete")


class CuttableHttp:
    """Hooks for an ``httpx.Client`` (``event_hooks=cuttable.event_hooks``)."""

    def __init__(self) -> None:
        self._streams: deque[Any] = deque(maxlen=_KEEP)
        self._lock = threading.Lock()
        self.cancelled = threading.Event()
        """Set by :meth:`cancel` (the caller went away), not by a deadline's cut."""

    @property
    def event_hooks(self) -> dict[str, list[Any]]:
        return {"request": [self._on_request]}

    def _on_request(self, request: httpx.Request) -> None:
        request.extensions["trace"] = self._trace

    def _trace(self, name: str, info: dict[str, Any]) -> None:
        if name in _CONNECTED and info.get("return_value") is not None:
            with self._lock:
                self._streams.append(info["return_value"])

    def cancel(self) -> None:
        """The caller went away: cut every request in flight and retry none."""
        self.cancelled.set()
        self.cut()

    def cut(self) -> None:
        """Fail every request in flight now (later requests go through as usual)."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            sock = stream.get_extra_info("socket")
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass


class Deadline:
    """``with Deadline(seconds, http):`` cuts ``http`` once ``seconds`` have passed."""

    def __init__(self, seconds: float, http: CuttableHttp) -> None:
        self.seconds = seconds
        self._http = http
        self._end = time.monotonic() + seconds
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        self.expired = True
        self._http.cut()

    def remaining(self) -> float:
        return max(0.001, self._end - time.monotonic())

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._timer.cancel()
