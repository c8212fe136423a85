"""Score every slide of a folder, an S3 prefix or a DICOMweb server, locally (threads) or
on a Dask cluster, resumably.

Layout of ``OUT_DIR``: ``slides/<key>/`` per slide (predictions.csv, predictions.geojson,
coords.h5, heatmap.png, run_metadata.json, summary.json; for encoders features.h5, and
features.pt on request), and per run
``run_metadata.json``, ``summary.csv`` (one row per slide) and ``failures.jsonl``.
A slide is scored into ``slides/.staging-<key>-<pid>/`` and renamed into place when
complete, so a result folder is never partial; stale staging folders are removed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .._io import atomic_write_bytes, atomic_write_text
from ..deidentify import pseudonym_for
from ..encoding import encode_image
from ..errors import WsiSamplerError
from ..export import run_metadata
from ..features import FeaturesDtype
from ..plan import PlanParams, TissueMask, compute_tissue_mask
from ..report import describe_slide
from ..scoring import OutputOptions, SlideScore, score_slide
from ..slide import Slide, open_slide
from ..worker import Worker, open_worker
from ..worker.vlm import VlmConfig, VlmWorker
from .discover import Discovery, SlideTask, discover_slides
from .resume import refuse_other_params, run_signature, sort_out

__all__ = ["EXIT_FAILURES", "BatchConfig", "RunReport", "run_batch", "score_task"]

EXIT_FAILURES = 3
"""Exit code of ``wsi-sampler score`` when at least one slide failed (0 = all succeeded)."""

logger = logging.getLogger("wsi_sampler.batch")
Executor = Literal["local", "dask"]


@dataclass(frozen=True)
class BatchConfig:
    """Everything a slide task needs; plain data, so it travels to Dask workers."""

    model: str = "tissue-qc"
    weights: str | None = None
    """Weights file of the model (e.g. a built-in encoder's pytorch_model.bin)."""
    worker_url: str | None = None
    worker_target_mpp: float | None = None
    """µm/px the remote model expects, for servers that publish no model card."""
    worker_patch_size: int | None = None
    worker_protocol: str = "auto"
    device: str = "auto"
    precision: str | None = None
    """Model arithmetic: auto, fp32, bf16, fp16 (see :mod:`wsi_sampler.models.precision`);
    None: WSI_PRECISION, else auto."""
    params: PlanParams = field(default_factory=PlanParams)
    mpp_override: float | None = None
    batch_size: int = 32
    allow_random_weights: bool = False
    features_dtype: FeaturesDtype = "float32"
    """Precision of the embeddings in each slide's features.h5 (float32 or float16)."""
    clam_pt: bool = False
    """Also write CLAM's features.pt (the (N, D) tensor) beside features.h5."""
    vlm: VlmConfig | None = None
    """A vision-language model: each slide's MedGemma bag is described (report.json)."""
    prompt: str | None = None
    deidentify: bool = False
    """Slides go by pseudonym (``pseudonyms``, else ``slide-<hash>``) in every record and
    file; no path, host or command line is written."""
    pseudonyms: dict[str, str] | None = None
    read_mpp: float | None = None
    """Read patches at this µm/px instead of the model's (a coarse scan)."""
    slide_models: tuple[tuple[str, str | None], ...] = ()
    """Slide models over each slide's features: (card path, checkpoint or None). Their
    answers are written beside the bag as ``<model>.slide.json``, ``<model>.attention.h5``…"""
    qc: bool = False
    """Also each slide's QC summary (``qc.json``, ``qc.png`` beside its results) and the
    run's ``qc.csv`` (:mod:`wsi_sampler.qc`)."""
    signature: str = ""
    """The run's signature (:func:`.resume.run_signature`), written into each slide's
    summary.json: a later run resumes only results of the same signature."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunReport:
    done: list[dict[str, Any]] = field(default_factory=list)
    """Summaries of slides scored in this run."""
    resumed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stopped: bool = False
    """The run was stopped (Ctrl-C) before every slide was scored."""

    @property
    def exit_code(self) -> int:
        return EXIT_FAILURES if self.failures else 0


# -- one slide (runs in a thread or on a Dask worker) ----------------------------------------------
_WORKERS: dict[str, Worker] = {}
_WORKERS_LOCK = threading.Lock()


def _worker_for(cfg: BatchConfig) -> Worker:
    """One model instance per process (a Dask worker keeps it across tasks)."""
    key = json.dumps([cfg.model, cfg.weights, cfg.worker_url, cfg.device, cfg.precision,
                      cfg.allow_random_weights,
                      cfg.worker_target_mpp, cfg.worker_patch_size, cfg.worker_protocol])
    with _WORKERS_LOCK:
        if key not in _WORKERS:
            _WORKERS[key] = open_worker(
                cfg.model, weights=cfg.weights, worker_url=cfg.worker_url, device=cfg.device,
                precision=cfg.precision, allow_random_weights=cfg.allow_random_weights,
                target_mpp=cfg.worker_target_mpp, patch_size_px=cfg.worker_patch_size,
                protocol=cfg.worker_protocol)
        return _WORKERS[key]


def _report_slide(slide: Slide, out_dir: Path, cfg: BatchConfig) -> dict[str, Any]:
    """Describe the slide's MedGemma bag: report.json, then summary.json (last)."""
    assert cfg.vlm is not None and cfg.prompt is not None
    vlm = VlmWorker(cfg.vlm)
    try:
        report = describe_slide(slide, cfg.params, vlm, cfg.prompt)
    finally:
        vlm.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    summary = {"slide": slide.name, "fingerprint": slide.fingerprint,
               "run_signature": cfg.signature,
               "model": report["model"], "patches": report["bag"]["n_patches"],
               "magnification": report["bag"]["magnification"],
               "seconds": report["timings_s"]["bag"] + report["timings_s"]["model"]}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _score_into(task: SlideTask, staging: Path, cfg: BatchConfig) -> dict[str, Any]:
    with open_slide(task.location, mpp_override=cfg.mpp_override) as slide:
        if task.alias:
            slide.pseudonymise(task.alias)
        if cfg.vlm is not None:
            return _report_slide(slide, staging, cfg)
        # with --qc, the slide's tissue (and artefact model) is computed once for both
        tissue = compute_tissue_mask(slide, tissue_mpp=cfg.params.tissue_mpp,
                                     params=cfg.params.tissue) if cfg.qc else None
        result = score_slide(slide, cfg.params, _worker_for(cfg), staging, tissue=tissue,
                             batch_size=cfg.batch_size,
                             config={"batch": cfg.to_dict(), "slide_rel": task.public,
                                     "run_signature": cfg.signature},
                             options=OutputOptions(cfg.features_dtype, cfg.clam_pt),
                             read_mpp=cfg.read_mpp)
        if cfg.slide_models:
            _answer_slide(slide, result, staging, cfg)
        if cfg.qc:
            _qc_slide(slide, result.summary, staging, cfg, tissue)
        return result.summary


def _qc_slide(slide: Slide, summary: dict[str, Any], staging: Path, cfg: BatchConfig,
              tissue: TissueMask | None) -> None:
    """The slide's QC summary, overlay and QuPath annotations beside its results; its row
    joins summary.json (rewritten: the folder is committed by its rename) and its warnings
    the log."""
    from ..geojson import dumps
    from ..qc import draw_qc_overlay, qc_collection, qc_row, slide_qc

    report, masks = slide_qc(slide, tissue_mpp=cfg.params.tissue_mpp,
                             params=cfg.params.tissue, tissue=tissue)
    atomic_write_text(staging / "qc.json", json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write_bytes(staging / "qc.png",
                       encode_image(draw_qc_overlay(slide.thumbnail(max_size=2048), masks)))
    atomic_write_text(staging / "qc.geojson", dumps(qc_collection(masks)))
    summary["qc"] = qc_row(report)
    summary_path = staging / "summary.json"
    stored = json.loads(summary_path.read_text())
    stored["qc"] = summary["qc"]
    atomic_write_text(summary_path, json.dumps(stored, indent=2) + "\n")
    for warning in report.warnings:
        logger.warning("%s: QC: %s", slide.name, warning)


_SLIDE_MODELS: dict[tuple[tuple[str, str | None], ...], list[Any]] = {}


def _slide_models_for(cfg: BatchConfig) -> list[Any]:
    """The run's slide models, loaded once per process."""
    from ..slide_models import load_slide_model

    with _WORKERS_LOCK:
        if cfg.slide_models not in _SLIDE_MODELS:
            _SLIDE_MODELS[cfg.slide_models] = [
                load_slide_model(card, weights=weights, device=cfg.device,
                                 allow_random_weights=cfg.allow_random_weights)
                for card, weights in cfg.slide_models]
        return _SLIDE_MODELS[cfg.slide_models]


def _answer_slide(slide: Slide, result: SlideScore, staging: Path, cfg: BatchConfig) -> None:
    """Each slide model's answer from the features just computed, written beside them; the
    answers join summary.json (rewritten: the folder is committed by its rename)."""
    from ..slide_models.predict import answer_scored_slide

    records = answer_scored_slide(slide, result, _slide_models_for(cfg), staging,
                                  prefix=lambda m: staging / m.name)
    result.summary["slide_models"] = {
        r["slide_model"]: {"predicted_class": r["predicted_class"],
                           "probabilities": r["probabilities"]} for r in records}
    summary_path = staging / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["slide_models"] = result.summary["slide_models"]
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")


def score_task(task: SlideTask, out: Path, cfg: BatchConfig) -> dict[str, Any]:
    """Score one slide into ``out/slides/<key>``; return its summary or a failure record.

    Any error fails this slide only (unexpected ones are logged with their traceback)."""
    final = out / "slides" / task.key
    staging = out / "slides" / f".staging-{task.key}-{os.getpid()}-{threading.get_ident()}"
    t0 = time.perf_counter()
    try:
        shutil.rmtree(staging, ignore_errors=True)
        summary = _score_into(task, staging, cfg)
        if final.exists():  # scored meanwhile by a duplicate task (Dask retry): keep one
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
        return {"status": "done", "slide": task.public, "key": task.key} | summary
    except Exception as exc:
        if not isinstance(exc, WsiSamplerError | OSError | ValueError):
            logger.exception("%s failed unexpectedly", task.public)
        shutil.rmtree(staging, ignore_errors=True)
        message = str(exc)
        if task.alias:  # the reader names the file; the record names the pseudonym
            message = message.replace(task.location, task.alias).replace(task.rel, task.alias)
        return {"status": "failed", "slide": task.public, "error": type(exc).__name__,
                "message": message, "seconds": round(time.perf_counter() - t0, 3)}


# -- executors -------------------------------------------------------------------------------------
def _local(tasks: list[SlideTask], out: Path, cfg: BatchConfig, workers: int,
           stop: threading.Event) -> Iterator[dict[str, Any]]:
    # Slides in flight share one model: reading/tissue detection of one overlaps inference
    # of another (the model itself runs one batch at a time). Tasks are handed out as slots
    # free up, so a stop lets the slides in flight finish and starts no other.
    queue = iter(tasks)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="wsi-slide") as pool:
        running: set[Future[dict[str, Any]]] = set()
        while True:
            while len(running) < max(1, workers) and not stop.is_set():
                task = next(queue, None)
                if task is None:
                    break
                running.add(pool.submit(score_task, task, out, cfg))
            if not running:
                return
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                yield fut.result()


def _dask(tasks: list[SlideTask], out: Path, cfg: BatchConfig, workers: int,
          address: str | None, retries: int, stop: threading.Event
          ) -> Iterator[dict[str, Any]]:
    from dask.distributed import Client, LocalCluster
    from dask.distributed import as_completed as dask_completed

    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1")
    try:
        with Client(cluster if cluster is not None else address) as client:
            # On GPU workers (dask worker --resources GPU=1) each slide task holds one GPU.
            resources = {"GPU": 1} if cfg.device == "cuda" else None
            futures = [client.submit(score_task, t, out, cfg, key=f"score-{t.key}",
                                     retries=retries, pure=False, resources=resources)
                       for t in tasks]
            for fut in dask_completed(futures):
                if stop.is_set():  # a stop: the tasks not yet done are cancelled
                    client.cancel([f for f in futures if not f.done()])
                    if fut.cancelled():
                        continue
                yield fut.result()
    finally:
        if cluster is not None:
            cluster.close()


def default_slide_workers() -> int:
    """Slides in flight: 2 on small machines, more on big ones (cores / 8, at most 8)."""
    cores = os.cpu_count() or 1
    return max(2, min(8, cores // 8))


# -- the run ---------------------------------------------------------------------------------------
def _prepare(out: Path) -> None:
    (out / "slides").mkdir(parents=True, exist_ok=True)
    for stale in (out / "slides").glob(".staging-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)


def run_batch(
    slides_root: Path | str, out: Path, cfg: BatchConfig, *, executor: Executor = "local",
    workers: int | None = None, address: str | None = None, retries: int = 1,
    resume: bool = True, on_result: Callable[[dict[str, Any], int, int], None] | None = None,
    overwrite: bool = False, stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunReport:
    """Score the slides of ``slides_root`` (a folder, an S3 prefix or a DICOMweb server)
    into ``out``; see the module docstring. Slides already scored there with the same
    parameters are kept (``resume``); results made with other parameters are refused
    (InvalidRequestError) unless ``overwrite``, which redoes them. Setting ``stop`` lets
    the slides in flight finish, starts no other, and writes the run's files."""
    t0 = time.perf_counter()
    found: Discovery = discover_slides(slides_root)
    if cfg.deidentify:
        found = _pseudonymised(found, cfg.pseudonyms)
    _prepare(out)
    report = RunReport(skipped=found.skipped)
    signature = run_signature(cfg.to_dict())
    state = sort_out(out, found.slides, signature)
    if state.other_params and resume and not overwrite:  # --no-resume redoes them all
        refuse_other_params(out, state, cfg.to_dict())
    kept = {t.key for t in state.done} if resume else set()
    todo = []
    for task in found.slides:
        if task.key in kept:
            report.resumed += 1
        else:
            shutil.rmtree(out / "slides" / task.key, ignore_errors=True)
            todo.append(task)
    cfg = replace(cfg, signature=signature)
    n_workers = workers or default_slide_workers()
    stop = stop or threading.Event()
    if on_start is not None:
        on_start(len(todo))
    results = (_local(todo, out, cfg, n_workers, stop) if executor == "local"
               else _dask(todo, out, cfg, n_workers, address, retries, stop))
    for i, rec in enumerate(results, 1):
        (report.done if rec["status"] == "done" else report.failures).append(rec)
        if on_result is not None:
            on_result(rec, i, len(todo))
    report.seconds = time.perf_counter() - t0
    report.stopped = stop.is_set()
    _write_run_files(out, found, report, cfg, executor, n_workers)
    return report


def _pseudonymised(found: Discovery, pseudonyms: dict[str, str] | None) -> Discovery:
    slides = [replace(t, alias=pseudonym_for(t.rel, pseudonyms)) for t in found.slides]
    skipped = [(pseudonym_for(rel, pseudonyms), reason) for rel, reason in found.skipped]
    return replace(found, slides=slides, skipped=skipped)


def _summary_rows(out: Path, found: Discovery, failures: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    failed = {f["slide"]: f for f in failures}
    rows = []
    for task in found.slides:
        summary_path = out / "slides" / task.key / "summary.json"
        if summary_path.is_file():
            s = json.loads(summary_path.read_text())
            row = {"slide": task.public, "status": "done", "result_dir": f"slides/{task.key}",
                   "patches": s["patches"], "seconds": s["seconds"], "error": ""}
            row |= {f"mean_{k}": v for k, v in s.get("mean", {}).items()}
            for name, answer in s.get("slide_models", {}).items():
                row[f"{name}_predicted"] = answer["predicted_class"]
                row |= {f"{name}_p_{c}": p for c, p in answer["probabilities"].items()}
        else:
            f = failed.get(task.public, {})
            row = {"slide": task.public, "status": "failed" if f else "pending", "result_dir": "",
                   "patches": "", "seconds": f.get("seconds", ""), "error": f.get("error", "")}
        rows.append(row)
    rows += [{"slide": rel, "status": "skipped", "error": reason} for rel, reason in found.skipped]
    return rows


def _write_qc_csv(out: Path, found: Discovery) -> None:
    """One row per scored slide: its QC summary (``qc.csv``, beside summary.csv)."""
    rows = []
    for task in found.slides:
        summary_path = out / "slides" / task.key / "summary.json"
        if summary_path.is_file():
            qc = json.loads(summary_path.read_text()).get("qc")
            if qc is not None:
                rows.append({"slide": task.public, **qc})
    _write_csv(out / "qc.csv", rows, first=["slide"])


def _write_csv(path: Path, rows: list[dict[str, Any]], first: list[str] | None = None) -> None:
    """``rows`` as CSV, the columns in the order they first appear (``first`` before)."""
    columns: list[str] = list(first or [])
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _write_run_files(out: Path, found: Discovery, report: RunReport, cfg: BatchConfig,
                     executor: str, workers: int) -> None:
    _write_csv(out / "summary.csv", _summary_rows(out, found, report.failures))
    if cfg.qc:
        _write_qc_csv(out, found)
    atomic_write_text(out / "failures.jsonl",
                      "".join(json.dumps(f) + "\n" for f in report.failures))
    config = {"batch": cfg.to_dict() | {"pseudonyms": None}, "executor": executor,
              "slide_workers": workers}
    if not cfg.deidentify:  # a command line and a host name can name a patient's folder
        config["argv"] = sys.argv
    meta = run_metadata(config=config, timings_s={"total": round(report.seconds, 3)})
    if not cfg.deidentify:
        meta["host"] = socket.gethostname()
    meta |= {"seed": cfg.params.seed, "stopped": report.stopped,
             "slides": len(found.slides), "scored": len(report.done),
             "resumed": report.resumed, "failed": len(report.failures),
             "skipped": len(found.skipped)}
    atomic_write_text(out / "run_metadata.json", json.dumps(meta, indent=2, default=str) + "\n")

