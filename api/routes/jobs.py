"""/v1/jobs: background scoring of one or many slides, with persistent state. A job belongs
to the API key that made it: other keys neither see nor touch it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from wsi_sampler.errors import InvalidRequestError

from ..deps import OwnerDep, ServicesDep
from ..schemas import ErrorBody, JobList, JobRequest, JobStatus, binary_content

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "Unknown job (or another API key's), slide or "
                                             "result"}}


@router.post("", status_code=202, response_model=JobStatus,
             responses={**NOT_FOUND, 422: {"model": ErrorBody, "description": "Bad parameters"},
                        429: {"model": ErrorBody, "description": "The job queue, or this API "
                              "key's share of it, is full (Retry-After)"},
                        503: {"model": ErrorBody, "description": "Worker not ready"},
                        507: {"model": ErrorBody, "description": "Not enough free disk space "
                              "for the job's results (min_free_disk_mb)"}})
async def create_job(req: JobRequest, services: ServicesDep, owner: OwnerDep) -> JobStatus:
    """Queue scoring of ``slides`` (or, with ``report``, a MedGemma report of each); returns
    at once with the job id (202)."""
    if req.report is None:
        services.require_worker()
    if req.slide_models:
        if req.report is not None:
            raise InvalidRequestError("a job either reports (report) or scores, with "
                                      "slide_models: not both")
        services.slide_models_for(req.slide_models)  # unknown names: 422 now, not later
    status = await run_in_threadpool(services.jobs.submit, req, owner)
    services.metrics.queue_depth.set(services.jobs.queue_depth)
    return JobStatus(**status)


@router.get("", response_model=JobList)
async def list_jobs(
    services: ServicesDep, owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,  # SQLite integers are 64-bit
) -> JobList:
    """The caller's jobs (those made with the same API key), newest first."""
    items, total = await run_in_threadpool(services.jobs.list_jobs, owner, limit=limit,
                                           offset=offset)
    return JobList(items=[JobStatus(**i) for i in items], total=total)


@router.get("/{job_id}", response_model=JobStatus, responses=NOT_FOUND)
async def job_status(job_id: str, services: ServicesDep, owner: OwnerDep) -> JobStatus:
    """State, progress, errors per slide, notes, and result files."""
    return JobStatus(**await run_in_threadpool(services.jobs.status, job_id, owner))


@router.get("/{job_id}/results/{name}", response_class=FileResponse, responses={
    # octet-stream first: generators that pick one representation read every result as bytes
    **NOT_FOUND, 200: {"content": binary_content(
        "application/octet-stream", "text/csv", "application/geo+json", "image/png",
        "application/x-hdf5", "application/json", "application/x-tar"),
        "description": "The result file"}})
async def job_result(job_id: str, name: str, services: ServicesDep, owner: OwnerDep
                     ) -> FileResponse:
    """One result file, by a name listed in the job's ``results``."""
    path, media = await run_in_threadpool(services.jobs.result_file, job_id, name, owner)
    return FileResponse(path, media_type=media, filename=name)


@router.delete("/{job_id}", response_model=JobStatus, responses=NOT_FOUND)
async def cancel_job(job_id: str, services: ServicesDep, owner: OwnerDep) -> JobStatus:
    """Cancel a queued or running job; remove a finished one with its files (the answer is
    its last status; the job is then gone: 404)."""
    return JobStatus(**await run_in_threadpool(services.jobs.cancel_or_delete, job_id, owner))
