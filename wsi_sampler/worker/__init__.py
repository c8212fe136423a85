"""Model workers: one interface, in-process torch or a remote Open Inference Protocol server.

Patches travel as uint8 RGB NHWC at the card's patch size; predictions come back as one
float32 (N, k) array per card output, in patch order. The names below load torch, so they
are imported on first use: ``wsi_sampler.worker.vlm`` (a VLM over HTTP) needs none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .base import InProcessWorker, Worker, open_worker
    from .batching import MicroBatcher
    from .remote import RemoteWorker

__all__ = ["InProcessWorker", "MicroBatcher", "RemoteWorker", "Worker", "open_worker"]

_HOMES = {"InProcessWorker": ".base", "Worker": ".base", "open_worker": ".base",
          "MicroBatcher": ".batching", "RemoteWorker": ".remote"}

__getattr__ = lazy_attributes(__name__, _HOMES)
