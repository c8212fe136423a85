"""Model workers: one interface, in-process torch or a remote Open Inference Protocol server.

Patches travel as uint8 RGB NHWC at the card's patch size; predictions come back as one
float32 (N, k) array per card output, in patch order.
"""

from __future__ import annotations

from .base import InProcessWorker, Worker, open_worker
from .batching import MicroBatcher
from .remote import RemoteWorker

__all__ = ["InProcessWorker", "MicroBatcher", "RemoteWorker", "Worker", "open_worker"]
