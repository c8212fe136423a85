"""Inference statistics of the OIP worker, in the layout of Triton's statistics extension
(``GET /v2/models/stats``, ``GET /v2/models/{name}/stats``), which ``tritonclient``'s
``get_inference_statistics`` reads. Counts are requests (``success``/``fail``), patches
(``inference_count``) and batches run by the model (``execution_count``); durations are ns.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelStats"]

_SECTIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
             "cache_hit", "cache_miss")


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


class ModelStats:
    """Thread-safe running statistics of one model version."""

    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version
        self._lock = threading.Lock()
        self._sections = {s: _Duration() for s in _SECTIONS}
        self._patches = 0
        self._batches = 0
        self._last_ms = 0

    def record(self, *, patches: int, ns: int, ok: bool) -> None:
        with self._lock:
            self._sections["success" if ok else "fail"].add(ns)
            if ok:
                self._sections["compute_infer"].add(ns)
                self._patches += patches
                self._batches += 1
            self._last_ms = int(time.time() * 1000)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "name": self.name, "version": self.version, "last_inference": self._last_ms,
                "inference_count": self._patches, "execution_count": self._batches,
                "inference_stats": {s: {"count": d.count, "ns": d.ns}
                                    for s, d in self._sections.items()},
                "batch_stats": [],
            }
