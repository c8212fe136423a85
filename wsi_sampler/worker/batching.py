"""Micro-batching: concurrent requests share one model call, up to the max batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from ..errors import InvalidRequestError
from ..models import Predictions

__all__ = ["MicroBatcher"]

_Item = tuple[npt.NDArray[np.uint8], "asyncio.Future[Predictions]"]


class MicroBatcher:
    """Gathers requests that arrive while the model is busy (or within ``max_delay_s``)
    into one call of ``predict`` of at most ``max_batch`` patches, then splits the result.

    Runs in the event loop that calls :meth:`start`; the model runs in one worker thread.
    """

    def __init__(
        self, predict: Callable[[npt.NDArray[np.uint8]], Predictions], *, max_batch: int,
        max_delay_s: float = 0.002,
    ) -> None:
        self._predict = predict
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wsi-model")
        self.batches = 0
        self.items = 0

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    async def submit(self, patches: npt.NDArray[np.uint8]) -> Predictions:
        if len(patches) > self.max_batch:
            raise InvalidRequestError(
                f"batch of {len(patches)} exceeds the model's max batch size {self.max_batch}"
            )
        fut: asyncio.Future[Predictions] = asyncio.get_running_loop().create_future()
        await self._queue.put((patches, fut))
        return await fut

    async def _gather(self) -> list[_Item]:
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        items, total = [first], len(first[0])
        deadline = asyncio.get_running_loop().time() + self.max_delay_s
        while total < self.max_batch:
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                nxt = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(
                    self._queue.get(), timeout)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if total + len(nxt[0]) > self.max_batch:
                self._carry = nxt
                break
            items.append(nxt)
            total += len(nxt[0])
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [it for it in await self._gather() if not it[1].cancelled()]
            if not items:
                continue
            batch = np.concatenate([p for p, _ in items]) if len(items) > 1 else items[0][0]
            try:
                result = await loop.run_in_executor(self._pool, self._predict, batch)
            except Exception as exc:
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(items)
            start = 0
            for patches, fut in items:
                end = start + len(patches)
                if not fut.done():
                    fut.set_result({k: v[start:end] for k, v in result.items()})
                start = end
