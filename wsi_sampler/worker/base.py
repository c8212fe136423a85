"""The worker interface and its in-process implementation."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..models import Model, ModelCard, Predictions, load_model

__all__ = ["InProcessWorker", "Worker", "open_worker"]


class Worker(Protocol):
    """What the sampler needs from a model worker."""

    card: ModelCard

    def infer(self, patches: npt.NDArray[np.uint8]) -> Predictions:
        """Predictions for (N, H, W, 3) uint8 patches; any N (split as the worker needs)."""
        ...

    def close(self) -> None: ...


class InProcessWorker:
    """A model run in this process (thread-safe; one prediction at a time)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.card = model.card

    @property
    def precision_info(self) -> dict[str, Any]:
        """The precision asked for, the one used and why (its numerics check)."""
        return dict(self.model.precision_info)

    def infer(self, patches: npt.NDArray[np.uint8]) -> Predictions:
        return self.model.predict(patches)

    def close(self) -> None:
        """Nothing to release: the model lives as long as this object."""

    def __enter__(self) -> InProcessWorker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_worker(
    model: str = "tissue-qc", *, weights: str | None = None, worker_url: str | None = None,
    device: str = "auto", allow_random_weights: bool = False, target_mpp: float | None = None,
    patch_size_px: int | None = None, protocol: str = "auto", precision: str | None = None,
) -> Worker:
    """In-process ``model`` (name or card path; ``weights``: its weights file), or the
    remote worker at ``worker_url`` (``protocol``: ``auto`` = binary tensors if the server
    offers them, ``binary``, ``json``)."""
    if worker_url:
        from .remote import RemoteWorker

        binary = {"auto": None, "binary": True, "json": False}[protocol]
        return RemoteWorker(worker_url, model, target_mpp=target_mpp,
                            patch_size_px=patch_size_px, binary=binary)
    return InProcessWorker(
        load_model(model, weights=weights, device=device,
                   allow_random_weights=allow_random_weights, precision=precision)
    )
