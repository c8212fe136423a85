"""The NDJSON of a report stream, kept alive while a vision-language model thinks.

The model's events are pumped from a thread of their own, so the stream can speak while it
waits: if the model says nothing (no words, no error) within ``FIRST_WORDS_GRACE_S``, the
bag record goes out at once (the answer is then a 200 and a later failure is the stream's
error record), followed by a ``{"type": "waiting", "seconds": …}`` record every
``KEEPALIVE_S`` until the first words. A model that answers or fails within the grace
behaves as before: an error is an ordinary status. When the client goes away the model
call is cut (:meth:`VlmWorker.cancel`), so no stream slot waits for it.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Generator
from contextlib import closing
from typing import Any

from wsi_sampler.plan import PatchPlan
from wsi_sampler.report import report_events
from wsi_sampler.slide import Slide
from wsi_sampler.worker.vlm import VlmWorker

__all__ = ["FIRST_WORDS_GRACE_S", "KEEPALIVE_S", "report_chunks"]

FIRST_WORDS_GRACE_S = 5.0
KEEPALIVE_S = 5.0
_END = object()
_QUIET = object()
_JOIN_S = 60.0  # reading and encoding the bag in flight, at most


class _Pump:
    """Runs a generator in a thread; :meth:`get` returns its next item, raises its error,
    or returns ``_QUIET`` when nothing came within ``timeout``."""

    def __init__(self, events: Generator[dict[str, Any], None, None]) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(events,),
                                        name="wsi-report-pump", daemon=True)
        self._thread.start()

    def _run(self, events: Generator[dict[str, Any], None, None]) -> None:
        try:
            with closing(events):
                for event in events:
                    self._queue.put(event)
        except BaseException as exc:  # handed to the stream, which reports it
            self._queue.put(exc)
        self._queue.put(_END)

    def get(self, timeout: float | None = None) -> object:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return _QUIET
        if isinstance(item, BaseException):
            raise item
        return item

    def join(self) -> None:
        self._thread.join(_JOIN_S)


def _line(event: object) -> bytes:
    return json.dumps(event).encode() + b"\n"


def _keepalives(pump: _Pump, since: float) -> Generator[bytes, None, object]:
    """Keep-alive lines until the model's first event, which is returned."""
    while (event := pump.get(KEEPALIVE_S)) is _QUIET:
        yield _line({"type": "waiting", "seconds": round(time.monotonic() - since, 1)})
    return event


def report_chunks(slide: Slide, plan: PatchPlan, vlm: VlmWorker, prompt: str
                  ) -> Generator[bytes, None, None]:
    """NDJSON report events: the bag, keep-alives while the model is quiet, its words,
    the report (see the module docstring for when errors are statuses)."""
    pump = _Pump(report_events(slide, plan, vlm, prompt))
    t0 = time.monotonic()
    try:
        bag = pump.get()
        first = pump.get(FIRST_WORDS_GRACE_S)
        head = _line(bag)
        if first is _QUIET:  # the model is slow: start the stream now, then keep it alive
            yield head
            head = b""
            first = yield from _keepalives(pump, t0)
        if first is not _END:
            yield head + _line(first)
        while (event := pump.get()) is not _END:
            yield _line(event)
    finally:
        vlm.cancel()  # cuts a call still in flight (the client went away)
        pump.join()
