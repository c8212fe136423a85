"""Batch scoring of slide folders: discovery, per-slide scoring, local and Dask executors.

A slide is the unit of work. Its results are written to a staging folder and renamed into
place, ``summary.json`` included, so a slide is done iff its folder (and summary) exists;
a run killed at any moment and started again scores every slide exactly once overall.
"""

from __future__ import annotations

from .discover import Discovery, SlideTask, discover, discover_slides
from .run import EXIT_FAILURES, BatchConfig, RunReport, run_batch

__all__ = [
    "EXIT_FAILURES",
    "BatchConfig",
    "Discovery",
    "RunReport",
    "SlideTask",
    "discover",
    "discover_slides",
    "run_batch",
]
