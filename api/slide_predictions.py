"""The body of a slide-level prediction stream: progress records while the slide's patches
are encoded, then one result record per slide model, then a summary. Errors after the first
record follow the stream failure contract of :mod:`.streaming` (an error record, then an
aborted response)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator
from contextlib import closing
from typing import Any

import numpy as np

from wsi_sampler import PatchPlan, Slide
from wsi_sampler.errors import InvalidRequestError
from wsi_sampler.scoring import iter_predictions
from wsi_sampler.slide_models import SlideModel, SlidePrediction
from wsi_sampler.worker import Worker

from .metrics import Metrics

__all__ = ["slide_prediction_chunks"]


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode() + b"\n"


def _attention_fields(pred: SlidePrediction, plan: PatchPlan) -> dict[str, Any]:
    if pred.attention is None:
        return {"patch_attention": None}
    return {"patch_attention": {
        "columns": list(pred.attention_columns), "x0": plan.x0.tolist(), "y0": plan.y0.tolist(),
        "width0": plan.width0, "height0": plan.height0,
        "scores": np.round(pred.attention, 6).tolist()}}


def slide_prediction_chunks(
    slide: Slide, slide_id: str, plan: PatchPlan, worker: Worker, models: list[SlideModel], *,
    batch_size: int, metrics: Metrics, cancel: threading.Event, include_attention: bool,
) -> Generator[bytes, None, None]:
    """``{"type": "progress"}`` per encoded batch, ``{"type": "result"}`` per slide model,
    then ``{"type": "summary"}``."""
    t0 = time.perf_counter()
    emb = worker.card.embedding_output
    if emb is None:
        raise InvalidRequestError(f"the service's model {worker.card.name!r} is not an encoder")
    if not len(plan):
        raise InvalidRequestError(f"{slide_id}: the plan holds no patch ({plan.note() or ''}); "
                                  "a slide model needs tissue patches")
    parts: list[np.ndarray] = []
    done = 0
    with closing(iter_predictions(slide, plan, worker, batch_size=batch_size,
                                  cancel=cancel)) as results:
        for batch, preds, worker_s in results:
            metrics.worker_latency.observe(worker_s)
            metrics.patches.labels("slide-predictions").inc(len(batch))
            parts.append(np.asarray(preds[emb.name], np.float32))
            done += len(batch)
            yield _line({"type": "progress", "slide_id": slide_id, "patches_done": done,
                         "patches_total": len(plan)})
    encode_s = time.perf_counter() - t0
    features = np.concatenate(parts) if parts else np.zeros((0, emb.width), np.float32)
    if len(features) != len(plan):
        raise InvalidRequestError(f"{done} of {len(plan)} planned patches were encoded")
    for model in models:
        pred = model.predict(features)
        rec = {"type": "result", "slide_id": slide_id} | pred.to_dict()
        if include_attention:
            rec |= _attention_fields(pred, plan)
        yield _line(rec)
    yield _line({"type": "summary", "slide_id": slide_id, "encoder": worker.card.name,
                 "patches": len(plan), "strategy": plan.strategy,
                 "slide_models": [m.name for m in models],
                 "seconds": {"encode": round(encode_s, 3),
                             "total": round(time.perf_counter() - t0, 3)}})
