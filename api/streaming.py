"""Streaming bodies: a synchronous producer (reading, encoding, inference in threads) driven
from the event loop one chunk at a time, and stopped when the client goes away.

Nothing is read before the client asks for the body, and a client that disconnects stops
the producer after its current batch: the extractor's threads are cancelled and the slide
closed (no orphan work).

Failure contract (also in the README):

- The first chunk is produced *before* the status line is sent, so a failure there (a
  corrupt first tile, a worker that refuses the first batch) is an ordinary 4xx/5xx JSON
  error.
- A failure after streaming began cannot change the status any more. NDJSON streams then
  end with ``{"type": "error", "status": ..., "error": ...}`` (never a summary), and the
  response is left incomplete, so the server aborts the connection: no chunked terminator
  and no tar end marker, and HTTP clients (curl, httpx) report a failed transfer.
- A clean end of stream therefore always means every planned patch was sent.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any, Literal

import anyio
import numpy as np
import numpy.typing as npt
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from wsi_sampler import Extractor, PatchBatch, PatchPlan, Slide
from wsi_sampler._tiles import default_threads
from wsi_sampler.encoding import encoded_batches
from wsi_sampler.errors import WsiSamplerError
from wsi_sampler.models import Predictions
from wsi_sampler.scoring import Aggregate, iter_predictions, output_columns
from wsi_sampler.worker import Worker

from .deps import Services
from .memory import release_free_memory
from .metrics import Metrics
from .middleware import send_json_error
from .tarball import END as TAR_END
from .tarball import TarMembers, npy_header

__all__ = ["ErrorDescriber", "ProducerResponse", "ndjson_error_record", "patch_chunks",
           "prediction_chunks", "slide_stream"]

logger = logging.getLogger("wsi_sampler.api.stream")
_FIRST_BATCH = 4  # small first batch: the first patch leaves quickly
_IMAGE_FORMATS = {"png": ("png", "image/png"), "jpeg": ("jpg", "image/jpeg"),
                  "raw": ("npy", "application/x-npy")}
_BATCH = 32
# A batch's chunk (6 MiB of raw patches) goes to the server in slices: HTTP framing and the
# socket copy then work on cache-sized pieces. 25 % more raw patches/s on 2 cores than
# whole chunks (python -m benchmarks.api); 64 KiB to 1 MiB measured alike.
_SEND_SLICE = 256 * 1024

ErrorDescriber = Callable[[BaseException], tuple[int, str]]
"""An exception -> (HTTP status, message safe to show the client)."""


class IncompleteStreamError(WsiSamplerError):
    """A producer ended before it sent everything it planned (a bug, never a clean end)."""


class _Producer:
    """Serialises next() and close() of a generator across threads."""

    def __init__(
        self, gen: Generator[bytes, None, None], on_close: Callable[[], None],
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self._gen = gen
        self._lock = threading.Lock()
        self._closed = False
        self._on_close = on_close
        self.interrupt = interrupt
        """Called at once (without waiting for the batch in flight) when the stream ends
        early: it makes a blocked producer give up (e.g. cuts a call to a hanging model)."""

    def next(self) -> bytes | None:
        with self._lock:
            if self._closed:
                return None
            try:
                return next(self._gen)
            except StopIteration:
                self.interrupt = None  # a clean end: nothing left to cut
                return None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._gen.close()
            finally:
                try:
                    self._on_close()
                finally:
                    release_free_memory()


def _close_soon(producer: _Producer) -> None:
    # Not awaited: a cancelled request must not wait for the batch in flight.
    if producer.interrupt is not None and not producer.closed:
        producer.interrupt()
    threading.Thread(target=producer.close, name="wsi-stream-close", daemon=True).start()


def ndjson_error_record(status: int, message: str) -> bytes:
    return json.dumps({"type": "error", "status": status, "error": message}).encode() + b"\n"


def _slices(chunk: bytes) -> Iterator[bytes]:
    """``chunk`` in pieces of at most ``_SEND_SLICE`` bytes (a small one as it is)."""
    if len(chunk) <= _SEND_SLICE:
        yield chunk
        return
    view = memoryview(chunk)
    for at in range(0, len(view), _SEND_SLICE):
        yield bytes(view[at : at + _SEND_SLICE])


class ProducerResponse(StreamingResponse):
    """A streaming response over a synchronous producer that keeps the failure contract
    above, and closes the producer whatever happens (also when the client goes away
    before the body was ever iterated)."""

    def __init__(
        self, gen: Generator[bytes, None, None], on_close: Callable[[], None], *,
        media_type: str, headers: dict[str, str], describe: ErrorDescriber,
        error_trailer: Callable[[int, str], bytes] | None = None,
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self._producer = _Producer(gen, on_close, interrupt)
        self._describe = describe
        self._error_trailer = error_trailer
        super().__init__(iter(()), media_type=media_type, headers=headers)

    async def _next(self) -> bytes | BaseException | None:
        try:
            # abandoned on cancel: a client that leaves does not wait for the batch in
            # flight (the producer is interrupted and closed behind it, see _close_soon)
            return await anyio.to_thread.run_sync(self._producer.next, abandon_on_cancel=True)
        except Exception as exc:  # reported to the client by the contract, never swallowed
            return exc

    async def stream_response(self, send: Send) -> None:
        chunk = await self._next()
        if isinstance(chunk, BaseException):
            status, message = self._describe(chunk)
            await send_json_error(send, status, message)
            return
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        while chunk is not None:
            for piece in _slices(chunk):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            chunk = await self._next()
            if isinstance(chunk, BaseException):
                await self._abort(send, chunk)
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _abort(self, send: Send, exc: BaseException) -> None:
        status, message = self._describe(exc)
        logger.warning("stream failed after it started (%d): %s", status, message)
        if self._error_trailer is not None:
            await send({"type": "http.response.body", "more_body": True,
                        "body": self._error_trailer(status, message)})
        # Returning without the final body message: the server closes the connection
        # without a chunked terminator, so the client sees a failed transfer.

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Our own watch for the client leaving: under ASGI 2.4 Starlette notices it only
        # when a send fails, and a stream waiting on its producer (a model that thinks)
        # sends nothing for a long time.
        try:
            async with anyio.create_task_group() as group:
                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away while we sent
                    pass
                group.cancel_scope.cancel()
        finally:
            _close_soon(self._producer)


NDJSON = "application/x-ndjson"


def slide_stream(
    services: Services, slide: Slide, n_patches: int, chunks: Generator[bytes, None, None],
    media_type: str, also_close: Callable[[], None] | None = None,
    interrupt: Callable[[], None] | None = None,
) -> ProducerResponse:
    """The response of a stream over an open slide holding a stream slot: whatever
    happens, the slide is closed (and ``also_close`` called) and the slot released."""
    def on_close() -> None:
        try:
            slide.close()
            if also_close is not None:
                also_close()
        finally:
            services.release_stream()

    headers = {"X-Patch-Count": str(n_patches), "Cache-Control": "no-store"}
    trailer = ndjson_error_record if media_type == NDJSON else None
    return ProducerResponse(chunks, on_close, media_type=media_type, headers=headers,
                            describe=services.describe, error_trailer=trailer,
                            interrupt=interrupt)


def patch_meta(slide_id: str, plan: PatchPlan, i: int) -> dict[str, Any]:
    return {"index": i, "slide_id": slide_id, "x0": int(plan.x0[i]), "y0": int(plan.y0[i]),
            "width0": plan.width0, "height0": plan.height0, "level": plan.level,
            "target_mpp": plan.target_mpp, "patch_size_px": plan.patch_size_px,
            "tissue_fraction": round(float(plan.tissue_fraction[i]), 4)}


_Payload = tuple[bytes | memoryview, ...]


def _image_batches(
    extractor: Extractor, image_format: str, pool: ThreadPoolExecutor
) -> Generator[tuple[list[int], list[_Payload]], None, None]:
    """(plan indices, each patch's member payload) per batch, in plan order. A stream closed
    early stops its extractor now (closing()), before the slide closes."""
    if image_format != "raw":  # stored JPEG tiles as they are where a plan allows
        ext = f".{_IMAGE_FORMATS[image_format][0]}"
        with closing(encoded_batches(extractor, ext, pool)) as encoded:
            for indices, images in encoded:
                yield indices, [(data,) for data in images]
        return
    with closing(extractor.iter_batches()) as batches:
        for batch in batches:  # header + the array's own memory: one copy, at join
            head = npy_header(batch.images.shape[1:])
            yield batch.indices.tolist(), [(head, memoryview(im).cast("B"))
                                           for im in batch.images]


def patch_chunks(
    slide: Slide, slide_id: str, plan: PatchPlan, *, as_tar: bool, image_format: str,
    metrics: Metrics,
) -> Generator[bytes, None, None]:
    """WebDataset tar members (``000042.png`` + ``000042.json``) or NDJSON lines (one
    ``{"type": "patch", ...}`` per patch, then ``{"type": "summary", "n_patches"}``). Images are
    encoded in parallel threads; ``raw`` sends ``.npy`` arrays and encodes nothing; ``jpeg``
    sends whole stored JPEG tiles as they are stored."""
    ext, media = _IMAGE_FORMATS[image_format]
    members = TarMembers(time.time())
    extractor = Extractor(slide, plan, batch_size=_BATCH, first_batch_size=_FIRST_BATCH)
    sent = 0
    with ThreadPoolExecutor(default_threads(), thread_name_prefix="wsi-encode") as pool, \
            closing(_image_batches(extractor, image_format, pool)) as batches:
        for indices, payloads in batches:
            sent += len(indices)
            parts: list[bytes | memoryview] = []
            for i, payload in zip(indices, payloads, strict=True):
                meta = patch_meta(slide_id, plan, i)
                if as_tar:
                    parts += members.member(f"{i:06d}.{ext}", *payload)
                    parts += members.member(f"{i:06d}.json", json.dumps(meta).encode())
                else:
                    data = b"".join(payload)
                    line = {"type": "patch"} | meta | {
                        "media_type": media, "image": base64.b64encode(data).decode()}
                    parts.append(json.dumps(line).encode() + b"\n")
            metrics.patches.labels("patches").inc(len(payloads))
            yield b"".join(parts)
    if sent != len(plan):
        raise IncompleteStreamError(f"{sent} of {len(plan)} planned patches read")
    if as_tar:
        yield TAR_END
    else:  # the terminal record: the stream ended as planned
        yield json.dumps({"type": "summary", "slide_id": slide_id, "n_patches": sent}
                         ).encode() + b"\n"


EmbeddingFormat = Literal["base64-float16", "base64-float32", "json", "none"]


def embedding_field(values: npt.NDArray[np.float32], fmt: EmbeddingFormat
                    ) -> dict[str, Any] | list[float] | None:
    """One patch's embedding in a prediction record: base64 of little-endian float16/32
    (``{"dtype", "shape", "data"}``), a JSON list, or nothing."""
    if fmt == "none":
        return None
    if fmt == "json":
        return [round(float(v), 6) for v in values]
    dtype = "float16" if fmt == "base64-float16" else "float32"
    data = np.ascontiguousarray(values, dtype="<f2" if dtype == "float16" else "<f4")
    return {"dtype": dtype, "shape": [len(values)],
            "data": base64.b64encode(data.tobytes()).decode("ascii")}


def prediction_chunks(
    slide: Slide, slide_id: str, plan: PatchPlan, worker: Worker, *, batch_size: int,
    metrics: Metrics, cancel: threading.Event, embedding_format: EmbeddingFormat = "base64-float16",
) -> Generator[bytes, None, None]:
    """One NDJSON record per patch as its batch completes, then a summary record."""
    t0 = time.perf_counter()
    agg = Aggregate(worker.card)
    results = iter_predictions(slide, plan, worker, batch_size=batch_size, cancel=cancel)
    with closing(results):
        yield from _prediction_lines(results, slide_id, plan, worker, agg, metrics,
                                     embedding_format)
    if agg.n != len(plan):
        raise IncompleteStreamError(f"{agg.n} of {len(plan)} planned patches scored")
    summary = {"type": "summary", "slide_id": slide_id, "model": worker.card.name,
               "model_version": worker.card.version, "strategy": plan.strategy,
               "n_candidates": plan.n_candidates, "message": plan.note()} | agg.summary()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    yield json.dumps(summary).encode() + b"\n"


def _prediction_lines(
    results: Iterator[tuple[PatchBatch, Predictions, float]], slide_id: str, plan: PatchPlan,
    worker: Worker, agg: Aggregate, metrics: Metrics, embedding_format: EmbeddingFormat,
) -> Iterator[bytes]:
    cols = output_columns(worker.card)
    emb = worker.card.embedding_output
    for batch, preds, worker_s in results:
        metrics.worker_latency.observe(worker_s)
        agg.add(preds, worker_s)
        lines = []
        for j, i in enumerate(batch.indices.tolist()):
            rec = {"type": "patch"} | patch_meta(slide_id, plan, i)
            rec["outputs"] = {col: round(float(preds[name][j, k]), 6) for name, k, col in cols}
            if emb is not None and embedding_format != "none":
                rec[emb.name] = embedding_field(preds[emb.name][j], embedding_format)
            lines.append(json.dumps(rec).encode())
        metrics.patches.labels("predictions").inc(len(batch))
        yield b"\n".join(lines) + b"\n"
