"""Background scoring jobs, with their state in SQLite so a restart keeps them.

A job scores one or more slides with the service's worker; each slide's files land in
``<data_dir>/jobs/<job id>/<slide id>/``. On startup, jobs that were queued or running
when the process stopped are marked ``interrupted`` (their finished slides stay).

Jobs belong to the API key that made them (its :func:`owner_of` digest, never the key):
another key sees, reads and cancels none of them (404). The queue is bounded
(``max_queued_jobs``) and so is each key's share of it (``max_jobs_per_key`` queued or
running): past either, a new job is a 429 with ``Retry-After``. Finished jobs and their
files are removed ``job_retention_hours`` after they finished, or by ``DELETE``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_sampler._io import atomic_write_text, disk_full_is_an_error, require_free_space
from wsi_sampler.errors import WsiSamplerError
from wsi_sampler.report import describe_slide
from wsi_sampler.scoring import Cancelled, SlideScore, result_files, score_slide
from wsi_sampler.slide import Slide
from wsi_sampler.slide_models import SlideModel
from wsi_sampler.tissue import TissueParams
from wsi_sampler.worker import Worker
from wsi_sampler.worker.vlm import VlmWorker

from .schemas import JobRequest, ReportRequest
from .slides import SlideRegistry

__all__ = ["JobLimits", "JobManager", "JobNotFoundError", "JobQuotaError", "owner_of"]

logger = logging.getLogger("wsi_sampler.api.jobs")
_MEDIA = {".csv": "text/csv", ".geojson": "application/geo+json", ".h5": "application/x-hdf5",
          ".png": "image/png", ".json": "application/json", ".tar": "application/x-tar"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    request TEXT NOT NULL, slides_done INTEGER NOT NULL DEFAULT 0,
    patches_done INTEGER NOT NULL DEFAULT 0, errors TEXT NOT NULL DEFAULT '[]',
    results TEXT NOT NULL DEFAULT '[]', notes TEXT NOT NULL DEFAULT '[]'
)
"""
# Columns added since the first schema: (name, declaration) for ALTER TABLE on old files.
_ADDED_COLUMNS = (("notes", "TEXT NOT NULL DEFAULT '[]'"), ("owner", "TEXT NOT NULL DEFAULT ''"))
_ACTIVE = ("queued", "running")


def _answer_slide(slide: Slide, result: SlideScore, heads: list[SlideModel], stage: Path
                  ) -> list[str]:
    """Each slide model's answer files in ``stage`` (``<model>.slide.json``…), by name."""
    if not heads:
        return []
    from wsi_sampler.slide_models.predict import answer_scored_slide

    records = answer_scored_slide(slide, result, heads, stage, prefix=lambda m: stage / m.name)
    files = [f"{head.name}.slide.json" for head in heads]
    return files + [f for r in records for f in r["files"].values()]


class JobNotFoundError(WsiSamplerError, LookupError):
    """No job (or no such result of a job) with that id (HTTP 404)."""


class JobQuotaError(WsiSamplerError):
    """The job queue, or the caller's share of it, is full (HTTP 429, Retry-After)."""


def owner_of(api_key: str | None) -> str:
    """Who owns a job: a digest of the API key that made it ('' without keys)."""
    if not api_key:
        return ""
    return hashlib.sha256(b"wsi-sampler job owner:" + api_key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class JobLimits:
    max_queued: int = 100
    """Jobs queued at once, all callers together."""
    per_owner: int = 20
    """Jobs one API key may have queued or running."""
    retention_s: float = 7 * 86_400
    """Finished jobs (and their files) are removed this long after they finished."""
    min_free_bytes: int = 256 << 20
    """A slide is not started with less free disk than this where results go."""


@dataclass
class _Progress:
    slides_done: int = 0
    patches_done: int = 0


class JobManager:
    """Queue, run, cancel and report jobs; ``workers`` jobs run at once."""

    def __init__(
        self, data_dir: Path, registry: SlideRegistry, get_worker: Callable[[], Worker | None],
        *, workers: int = 1, batch_size: int = 32, limits: JobLimits = JobLimits(),
    ) -> None:
        self.root = data_dir / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.get_worker = get_worker
        self.batch_size = batch_size
        self.limits = limits
        self.scrub: Callable[[str], str] = lambda message: message
        self.vlm_for: Callable[[ReportRequest], VlmWorker] | None = None
        self.slide_models_for: Callable[[list[str] | None], list[SlideModel]] | None = None
        self.tissue_params: TissueParams | None = None
        """The service's tissue settings (its artefact model), set by the app."""
        self._db = sqlite3.connect(data_dir / "jobs.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, declaration in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
        self._lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="wsi-job")
        self._mark_interrupted()
        self.remove_expired()

    def _mark_interrupted(self) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state='interrupted', updated=?"
                " WHERE state IN ('queued','running')",
                (time.time(),),
            )

    @property
    def queue_depth(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state='queued'").fetchone()
        return int(row[0])

    # -- API ------------------------------------------------------------------------------------
    def _check_quota(self, owner: str) -> None:
        with self._lock:
            queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state='queued'"
                                      ).fetchone()[0]
            mine = self._db.execute("SELECT COUNT(*) FROM jobs WHERE owner=? AND state IN "
                                    "('queued','running')", (owner,)).fetchone()[0]
        if queued >= self.limits.max_queued:
            raise JobQuotaError(f"the job queue is full ({queued} jobs queued); try again "
                                "when some have finished")
        if mine >= self.limits.per_owner:
            raise JobQuotaError(f"this API key has {mine} jobs queued or running, the most "
                                f"it may (max_jobs_per_key={self.limits.per_owner}); wait for "
                                "them to finish or cancel some")

    def submit(self, request: JobRequest, owner: str = "") -> dict[str, Any]:
        self.remove_expired()
        self._check_quota(owner)
        require_free_space(self.root, self.limits.min_free_bytes, "a new job's results")
        for sid in request.slides:  # unknown ids are a 404 now, not a failed job later
            self.registry.get(sid)
        if request.report is not None:  # no model configured is a 503 now
            self._vlm(request.report).close()
            request.report.to_params(self.tissue_params)
        else:
            request.sampling.to_params(self.tissue_params)  # invalid sampling: a 422 now
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, state, created, updated, request, owner) "
                "VALUES (?,?,?,?,?,?)",
                (job_id, "queued", now, now, request.model_dump_json(), owner),
            )
            self._cancel[job_id] = threading.Event()
        self._pool.submit(self._run, job_id, request)
        return self.status(job_id, owner)

    _COLUMNS = ("id, state, created, updated, request, slides_done, patches_done, errors, "
                "results, notes")

    def status(self, job_id: str, owner: str = "") -> dict[str, Any]:
        """A job of ``owner``'s; another owner's job is not found."""
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM jobs WHERE id=? AND owner=?",
                                   (job_id, owner)).fetchone()
        if row is None:
            raise JobNotFoundError(f"unknown job {job_id!r}")
        return self._status_of(row)

    def list_jobs(self, owner: str = "", *, limit: int = 100, offset: int = 0
             ) -> tuple[list[dict[str, Any]], int]:
        """``owner``'s jobs, newest first, and how many there are."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._COLUMNS} FROM jobs WHERE owner=? ORDER BY created DESC "
                "LIMIT ? OFFSET ?", (owner, limit, offset)).fetchall()
            total = self._db.execute("SELECT COUNT(*) FROM jobs WHERE owner=?", (owner,)
                                     ).fetchone()[0]
        return [self._status_of(r) for r in rows], int(total)

    def _slide_name(self, sid: str) -> str:
        try:
            return self.registry.get(sid).name
        except WsiSamplerError:  # removed since: its id is all we know
            return sid

    def _status_of(self, row: tuple[Any, ...]) -> dict[str, Any]:
        request = json.loads(row[4])
        files = json.loads(row[8])
        names = {sid: self._slide_name(sid) for sid in {n.partition(".")[0] for n in files}}
        return {
            "id": row[0], "state": row[1], "created": row[2], "updated": row[3],
            "slides_total": len(request["slides"]), "slides_done": row[5],
            "patches_done": row[6], "errors": json.loads(row[7]),
            "results": [
                {"name": n, "media_type": _MEDIA.get(Path(n).suffix, "application/octet-stream"),
                 "url": f"/v1/jobs/{row[0]}/results/{n}", "slide_id": n.partition(".")[0],
                 "slide_name": names[n.partition(".")[0]]}
                for n in files
            ],
            "notes": json.loads(row[9]),
            "slides_complete": sorted(names),
        }

    def cancel_or_delete(self, job_id: str, owner: str = "") -> dict[str, Any]:
        """Cancel a queued or running job; remove a finished one and its files (its last
        status is returned)."""
        current = self.status(job_id, owner)
        if current["state"] not in _ACTIVE:
            if job_id not in self._cancel:  # its thread has returned: nothing writes there
                self._remove(job_id)
            return current
        event = self._cancel.get(job_id)
        if event is not None:
            event.set()
        self._update(job_id, state="cancelled", only_if_active=True)
        return self.status(job_id, owner)

    def remove_expired(self) -> int:
        """Remove finished jobs older than the retention, with their files; how many."""
        cutoff = time.time() - self.limits.retention_s
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE updated < ? AND state NOT IN "
                                    "('queued','running')", (cutoff,)).fetchall()
        gone = [job_id for (job_id,) in rows if job_id not in self._cancel]
        for job_id in gone:
            self._remove(job_id)
        return len(gone)

    def _remove(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def result_file(self, job_id: str, name: str, owner: str = "") -> tuple[Path, str]:
        """(path, media type) of a result listed by the job; anything else is not found."""
        listed = {r["name"]: r["media_type"] for r in self.status(job_id, owner)["results"]}
        if name not in listed:
            raise JobNotFoundError(f"job {job_id} has no result {name!r}")
        slide_id, _, file = name.partition(".")
        return self.root / job_id / slide_id / file, listed[name]

    def close(self) -> None:
        """Stop: running jobs stop at their next batch and, like queued ones, are marked
        ``interrupted`` now (a SIGTERM leaves no job ``running``; slides done stay)."""
        for event in self._cancel.values():
            event.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._mark_interrupted()
        self._db.close()

    # -- running -------------------------------------------------------------------------------
    def _update(self, job_id: str, *, only_if_active: bool = False, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        values = [json.dumps(v) if isinstance(v, list) else v for v in fields.values()]
        where = "id=? AND state IN ('queued','running')" if only_if_active else "id=?"
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols}, updated=? WHERE {where}",  # noqa: S608
                             (*values, time.time(), job_id))

    def _run(self, job_id: str, request: JobRequest) -> None:
        try:
            self._run_slides(job_id, request)
        except Exception:  # a job is never left "running" by a failure of its own
            logger.exception("job %s failed", job_id)
            self._update(job_id, state="failed", only_if_active=True)
        finally:
            self._cancel.pop(job_id, None)

    def _run_slides(self, job_id: str, request: JobRequest) -> None:
        cancel = self._cancel[job_id]
        if cancel.is_set():
            return
        self._update(job_id, state="running", only_if_active=True)
        progress = _Progress()
        errors: list[dict[str, str]] = []
        results: list[str] = []
        notes: list[dict[str, str]] = []
        for sid in request.slides:
            if cancel.is_set():
                return
            try:
                files, note = self._score_one(job_id, sid, request, cancel, progress)
                results += files
                if note:
                    notes.append({"slide": sid, "message": self.scrub(note)})
            except Cancelled:
                return
            except Exception as exc:  # any failure fails this slide; the job goes on
                if not isinstance(exc, WsiSamplerError | OSError):
                    logger.exception("job %s: slide %s failed unexpectedly", job_id, sid)
                errors.append({"slide": sid, "error": type(exc).__name__,
                               "message": self.scrub(str(exc))})
            progress.slides_done += 1
            self._update(job_id, slides_done=progress.slides_done,
                         patches_done=progress.patches_done, errors=errors, results=results,
                         notes=notes)
        state = "succeeded" if not errors else "failed" if not results else "partial"
        self._update(job_id, state=state, only_if_active=True)

    def _vlm(self, req: ReportRequest) -> VlmWorker:
        if self.vlm_for is None:
            raise WsiSamplerError("reports are not available in this job manager")
        return self.vlm_for(req)

    def _report_one(self, job_id: str, sid: str, req: ReportRequest, progress: _Progress
                    ) -> tuple[list[str], str | None]:
        vlm = self._vlm(req)
        try:
            with self.registry.open(sid, mpp_override=req.mpp_override) as slide:
                report = describe_slide(slide, req.to_params(self.tissue_params), vlm,
                                        req.prompt)
        finally:
            vlm.close()
        atomic_write_text(self.root / job_id / sid / "report.json", json.dumps(report, indent=2))
        progress.patches_done += int(report["bag"]["n_patches"])
        return [f"{sid}.report.json"], None

    def _score_one(
        self, job_id: str, sid: str, request: JobRequest, cancel: threading.Event,
        progress: _Progress,
    ) -> tuple[list[str], str | None]:
        """The slide's result files, and a note on its plan (why it is empty or short)."""
        if request.report is not None:
            return self._report_one(job_id, sid, request.report, progress)
        worker = self.get_worker()
        if worker is None:
            raise WsiSamplerError("no model worker is available")
        heads = self._slide_models(request)
        out = self.root / job_id / sid
        base = progress.patches_done

        def report(done: int, total: int) -> None:
            progress.patches_done = base + done
            self._update(job_id, patches_done=progress.patches_done)

        # Results are written into a staging folder and moved into place when complete:
        # a slide that fails (a full disk, a cancel) leaves no partial files behind.
        stage = out.with_name(f".{sid}.partial")
        require_free_space(out.parent, self.limits.min_free_bytes, f"the results of {sid}")
        try:
            with disk_full_is_an_error(f"the results of {sid}"), \
                    self.registry.open(sid, mpp_override=request.sampling.mpp_override) as slide:
                params = request.sampling.to_params(self.tissue_params)
                result = score_slide(slide, params, worker, stage,
                                     batch_size=self.batch_size, cancel=cancel,
                                     progress=report, config={
                                         "job": job_id, "sampling": request.sampling.model_dump()})
                answers = _answer_slide(slide, result, heads, stage)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return ([f"{sid}.{name}" for name in [*result_files(worker.card), *answers]],
                result.summary.get("message"))

    def _slide_models(self, request: JobRequest) -> list[SlideModel]:
        if not request.slide_models:
            return []
        if self.slide_models_for is None:
            raise WsiSamplerError("slide models are not available in this job manager")
        return self.slide_models_for(request.slide_models)
