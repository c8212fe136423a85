"""Turn a :class:`~wsi_sampler.plan.PatchPlan` into pixels.

Frame: patch coordinates are level-0 pixels; patches come out as uint8 RGB, (H, W, 3)
alone or (N, H, W, 3) in a batch, at the plan's target resolution.

This is the reference path (``Slide.read_scaled`` per patch, in a small thread pool).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import InvalidRequestError
from .plan import PatchPlan
from .slide import Slide
from .types import RGBImage

__all__ = ["Extractor", "PatchBatch"]


@dataclass(frozen=True)
class PatchBatch:
    """Consecutive patches of a plan."""

    images: RGBImage
    """(N, H, W, 3) uint8, C-contiguous."""
    indices: npt.NDArray[np.int64]
    """Positions of these patches in the plan."""
    x0: npt.NDArray[np.int64]
    y0: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.indices)


class Extractor:
    """Read the patches of a plan in batches; memory is bounded by ``batch_size``."""

    def __init__(
        self, slide: Slide, plan: PatchPlan, *, batch_size: int = 64, threads: int | None = None
    ) -> None:
        if batch_size < 1:
            raise InvalidRequestError(f"batch_size must be >= 1, got {batch_size}")
        self.slide = slide
        self.plan = plan
        self.batch_size = batch_size
        self.threads = threads or min(4, os.cpu_count() or 1)

    def read_patch(self, index: int) -> RGBImage:
        """Read patch ``index`` of the plan."""
        p = self.plan
        size = p.patch_size_px
        return self.slide.read_scaled(
            int(p.x0[index]), int(p.y0[index]), p.width0, p.height0, (size, size)
        )

    def iter_batches(self) -> Iterator[PatchBatch]:
        """Yield batches in plan order."""
        n = len(self.plan)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="wsi-extract") as pool:
            for start in range(0, n, self.batch_size):
                idx = np.arange(start, min(start + self.batch_size, n), dtype=np.int64)
                images = np.stack(list(pool.map(self.read_patch, idx.tolist())))
                yield PatchBatch(images, idx, self.plan.x0[idx], self.plan.y0[idx])

    def iter_patches(self) -> Iterator[tuple[int, RGBImage]]:
        """Yield ``(index, patch)`` pairs in plan order."""
        for batch in self.iter_batches():
            yield from zip(batch.indices.tolist(), batch.images, strict=True)
