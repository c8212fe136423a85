"""Prometheus metrics of one app instance (its own registry, so tests can run many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("wsi_http_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.patches = Counter("wsi_patches_streamed_total", "Patches streamed to clients",
                               ["kind"], registry=self.registry)
        self.worker_latency = Histogram(
            "wsi_worker_latency_seconds", "Model worker time per batch", registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.active_streams = Gauge("wsi_active_streams", "Streaming responses in progress",
                                    registry=self.registry)
        self.queue_depth = Gauge("wsi_job_queue_depth", "Jobs waiting to run",
                                 registry=self.registry)
