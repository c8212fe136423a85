"""Score a slide: its patches through a model worker, predictions out, aggregated.

Frame: coordinates are level-0 pixels. Patches are planned at the model card's patch size
and MPP; the sampling strategy and its options come from the caller. Used by the API
(streaming predictions, jobs) and by batch scoring of folders.

Per-patch values (class probabilities, measurements) become table columns (CSV, GeoJSON,
means in the summary); an encoder's embedding is kept whole and leaves as a feature bag
(``features.h5``), never as thousands of text columns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InvalidRequestError, WsiSamplerError
from .export import (
    run_metadata,
    write_clam_h5,
    write_csv,
    write_geojson,
    write_heatmap_png,
    write_metadata_json,
)
from .extract import Extractor, PatchBatch
from .features import FeaturesDtype, write_features_h5, write_features_pt
from .models import ModelCard, Predictions
from .plan import PatchPlan, PlanParams, TissueMask, make_plan
from .slide import Slide
from .tissue import is_fluorescence
from .worker import Worker

__all__ = [
    "Aggregate",
    "Cancelled",
    "SlideScore",
    "iter_predictions",
    "model_plan_params",
    "output_columns",
    "result_files",
    "score_slide",
]

RESULT_FILES = ("predictions.csv", "predictions.geojson", "coords.h5", "heatmap.png",
                "run_metadata.json", "summary.json")
FEATURE_FILES = ("features.h5",)


def result_files(card: ModelCard, *, clam_pt: bool = False) -> tuple[str, ...]:
    """The files :func:`score_slide` writes for a model with this card."""
    if card.embedding_output is None:
        return RESULT_FILES
    return RESULT_FILES + FEATURE_FILES + (("features.pt",) if clam_pt else ())


class Cancelled(WsiSamplerError):
    """The caller cancelled the work (a job was deleted, a client went away)."""


def model_plan_params(card: ModelCard, params: PlanParams, read_mpp: float | None = None
                      ) -> PlanParams:
    """``params`` with the model's patch size and resolution (what the model was built for),
    or read at ``read_mpp`` µm/px instead where the caller says so (a coarse scan)."""
    if params.strategy == "medgemma":
        raise InvalidRequestError(
            "the medgemma preset fixes its own patch size and magnification; use it to plan or "
            "extract patches, or pick grid, random or stratified for predictions"
        )
    return replace(params, patch_size_px=card.patch_size_px,
                   target_mpp=read_mpp or card.target_mpp, magnification=None)


def _model_warnings(slide: Slide, card: ModelCard) -> list[str]:
    """What makes this model's answer doubtful on this slide."""
    if card.architecture == "builtin:tissue-qc" and is_fluorescence(
            slide.thumbnail(max_size=256)):
        return ["a fluorescence slide: the built-in tissue-qc model measures bright-field "
                "(H&E) patches only, so its values say nothing here"]
    return []


def output_columns(card: ModelCard) -> list[tuple[str, int, str]]:
    """(output name, column index, column name) of every table column: every column of every
    output but the embedding (:attr:`ModelCard.embedding_output`, kept whole)."""
    emb = card.embedding_output
    return [(o.name, i, col) for o in card.outputs if o is not emb
            for i, col in enumerate(o.column_names())]


def iter_predictions(
    slide: Slide, plan: PatchPlan, worker: Worker, *, batch_size: int = 32,
    cancel: threading.Event | None = None,
) -> Generator[tuple[PatchBatch, Predictions, float], None, None]:
    """Yield (patch batch, predictions, seconds in the worker) in plan order."""
    size = min(batch_size, worker.card.max_batch)
    with closing(Extractor(slide, plan, batch_size=max(1, size)).iter_batches()) as batches:
        for batch in batches:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            t = time.perf_counter()
            preds = worker.infer(batch.images)
            yield batch, preds, time.perf_counter() - t


@dataclass
class Aggregate:
    """Running per-column mean and max, QC label counts and timings over a slide."""

    card: ModelCard
    n: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    maxes: dict[str, float] = field(default_factory=dict)
    worker_s: float = 0.0

    def add(self, preds: Predictions, worker_s: float) -> None:
        for name, i, col in output_columns(self.card):
            values = preds[name][:, i]
            if len(values):
                self.sums[col] = self.sums.get(col, 0.0) + float(values.sum())
                self.maxes[col] = max(self.maxes.get(col, -np.inf), float(values.max()))
        self.n += len(next(iter(preds.values()))) if preds else 0
        self.worker_s += worker_s

    def summary(self) -> dict[str, Any]:
        means = {c: s / self.n for c, s in self.sums.items()} if self.n else {}
        qc = {c.removeprefix("qc_"): round(v, 4) for c, v in means.items() if c.startswith("qc_")}
        return {
            "patches": self.n,
            "mean": {c: round(v, 6) for c, v in means.items()},
            "max": {c: round(v, 6) for c, v in self.maxes.items()},
            "qc_fractions": qc,
            "worker_seconds": round(self.worker_s, 3),
        }


@dataclass
class SlideScore:
    plan: PatchPlan
    outputs: dict[str, npt.NDArray[np.float32]]
    """Column name -> (N,) values, in plan order (table columns only)."""
    summary: dict[str, Any]
    features: npt.NDArray[np.float32] | None = None
    """(N, D) embeddings of an encoder, in plan order."""


def classifier_columns(card: ModelCard) -> list[tuple[str, str]]:
    """(column, class name) of the card's first classifier output (class probabilities)."""
    for o in card.outputs:
        if o.activation != "none" and o.class_names:
            return list(zip(o.column_names(), o.class_names, strict=True))
    return []


def heatmap_column(card: ModelCard) -> str | None:
    """The column a heatmap shows: the first class probability, else the first column; None
    for a pure encoder (its heatmap shows the patches' tissue fraction)."""
    for o in card.outputs:
        if o.activation != "none" and o.class_names:
            return o.column_names()[-1]
    columns = output_columns(card)
    return columns[0][2] if columns else None


@dataclass(frozen=True)
class OutputOptions:
    """What :func:`score_slide` writes besides the tables: feature bag precision, CLAM .pt."""

    features_dtype: FeaturesDtype = "float32"
    clam_pt: bool = False


@dataclass
class _Collected:
    columns: dict[str, list[npt.NDArray[np.float32]]]
    embeddings: list[npt.NDArray[np.float32]] = field(default_factory=list)

    def add(self, card: ModelCard, preds: Predictions) -> None:
        for name, i, col in output_columns(card):
            self.columns[col].append(preds[name][:, i])
        emb = card.embedding_output
        if emb is not None:
            self.embeddings.append(preds[emb.name])

    def outputs(self) -> dict[str, npt.NDArray[np.float32]]:
        return {c: np.concatenate(v) if v else np.zeros(0, np.float32)
                for c, v in self.columns.items()}

    def features(self, card: ModelCard) -> npt.NDArray[np.float32] | None:
        emb = card.embedding_output
        if emb is None:
            return None
        return (np.concatenate(self.embeddings) if self.embeddings
                else np.zeros((0, emb.width), np.float32))


def score_slide(
    slide: Slide, params: PlanParams, worker: Worker, out_dir: Path | None = None, *,
    batch_size: int = 32, cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None, config: dict[str, Any] | None = None,
    options: OutputOptions = OutputOptions(), read_mpp: float | None = None,
    tissue: TissueMask | None = None,
) -> SlideScore:
    """Plan, extract, predict, aggregate; with ``out_dir``, write the result files.
    ``read_mpp``: read patches at this µm/px instead of the model's (a coarse scan);
    ``tissue``: the slide's tissue mask when it is at hand (else detected).

    ``summary.json`` is written last and atomically: a slide is done iff it exists.
    """
    t0 = time.perf_counter()
    plan = make_plan(slide, model_plan_params(worker.card, params, read_mpp), tissue=tissue)
    t_plan = time.perf_counter() - t0
    agg = Aggregate(worker.card)
    collected = _Collected({c: [] for _, _, c in output_columns(worker.card)})
    done = 0
    for batch, preds, worker_s in iter_predictions(slide, plan, worker, batch_size=batch_size,
                                                   cancel=cancel):
        agg.add(preds, worker_s)
        collected.add(worker.card, preds)
        done += len(batch)
        if progress is not None:
            progress(done, len(plan))
    total = time.perf_counter() - t0
    summary = agg.summary() | {
        "slide": slide.name, "fingerprint": slide.fingerprint, "model": worker.card.name,
        "model_version": worker.card.version, "strategy": plan.strategy,
        "n_candidates": plan.n_candidates, "seconds": round(total, 3),
        "timings_s": {"plan": round(t_plan, 3), "total": round(total, 3)},
    }
    precision = getattr(worker, "precision_info", None)
    if precision is not None:  # in-process models: what they ran in, and why
        summary["precision"] = precision
    note = plan.note()
    if note:
        summary["message"] = note
    if "exclusion" in plan.selection:
        summary["exclusion"] = plan.selection["exclusion"]
    warnings = _model_warnings(slide, worker.card)
    if warnings:
        summary["warnings"] = warnings
    result = SlideScore(plan, collected.outputs(), summary, collected.features(worker.card))
    if result.features is not None:
        summary["embedding_dim"] = int(result.features.shape[1])
    if out_dir is not None:
        write_results(out_dir, slide, result, worker.card, config or {}, options)
    return result


def write_results(
    out_dir: Path, slide: Slide, result: SlideScore, card: ModelCard, config: dict[str, Any],
    options: OutputOptions = OutputOptions(),
) -> None:
    """The per-slide result files; ``summary.json`` last."""
    plan, outputs, summary = result.plan, result.outputs, result.summary
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "predictions.csv", plan, outputs)
    write_geojson(out_dir / "predictions.geojson", plan, outputs, slide_key=slide.fingerprint,
                  classes=classifier_columns(card))
    write_clam_h5(out_dir / "coords.h5", plan, slide)
    if result.features is not None:
        write_features_h5(out_dir / "features.h5", plan, slide, result.features, card,
                          dtype=options.features_dtype)
        if options.clam_pt:
            write_features_pt(out_dir / "features.pt", result.features,
                              dtype=options.features_dtype)
    col = heatmap_column(card)
    values = outputs[col] if col is not None else plan.tissue_fraction
    hi = float(values.max()) if len(values) and col and not col.startswith(
        ("prob_", "qc_")) else 1.0
    write_heatmap_png(out_dir / "heatmap.png", slide.thumbnail(max_size=1024), plan, values,
                      vmax=hi if hi > 0 else 1.0, label=col or "tissue_fraction")
    meta = run_metadata(slide=slide, plan=plan, config=config | {"model": card.model_dump()},
                        timings_s=summary["timings_s"])
    if "precision" in summary:
        meta["precision"] = summary["precision"]
    # What was read, whatever the request said: the model's card fixes the patch size and
    # resolution (config holds the request as given).
    meta["read"] = {"patch_size_px": plan.patch_size_px, "target_mpp": plan.target_mpp,
                    "magnification": plan.magnification, "strategy": plan.strategy,
                    "n_patches": len(plan), "model": card.name,
                    "model_patch_size_px": card.patch_size_px,
                    "model_target_mpp": card.target_mpp}
    write_metadata_json(out_dir / "run_metadata.json", meta)
    extra = {"run_signature": config["run_signature"]} if "run_signature" in config else {}
    write_metadata_json(out_dir / "summary.json",
                        summary | {"heatmap_column": col or "tissue_fraction"} | extra)
