"""/v1/jobs: background scoring of one or many slides, with persistent state."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ..deps import ServicesDep
from ..schemas import ErrorBody, JobRequest, JobStatus, binary_content

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "Unknown job, slide or result"}}


@router.post("", status_code=202, response_model=JobStatus,
             responses={**NOT_FOUND, 422: {"model": ErrorBody, "description": "Bad parameters"},
                        503: {"model": ErrorBody, "description": "Worker not ready"}})
async def create_job(req: JobRequest, services: ServicesDep) -> JobStatus:
    """Queue scoring of ``slides`` (or, with ``report``, a MedGemma report of each); returns
    at once with the job id (202)."""
    if req.report is None:
        services.require_worker()
    status = await run_in_threadpool(services.jobs.submit, req)
    services.metrics.queue_depth.set(services.jobs.queue_depth)
    return JobStatus(**status)


@router.get("/{job_id}", response_model=JobStatus, responses=NOT_FOUND)
async def job_status(job_id: str, services: ServicesDep) -> JobStatus:
    """State, progress, errors per slide, and result files."""
    return JobStatus(**await run_in_threadpool(services.jobs.status, job_id))


@router.get("/{job_id}/results/{name}", response_class=FileResponse, responses={
    # octet-stream first: generators that pick one representation read every result as bytes
    **NOT_FOUND, 200: {"content": binary_content(
        "application/octet-stream", "text/csv", "application/geo+json", "image/png",
        "application/x-hdf5", "application/json"), "description": "The result file"}})
async def job_result(job_id: str, name: str, services: ServicesDep) -> FileResponse:
    """One result file, by a name listed in the job's ``results``."""
    path, media = await run_in_threadpool(services.jobs.result_file, job_id, name)
    return FileResponse(path, media_type=media, filename=name)


@router.delete("/{job_id}", response_model=JobStatus, responses=NOT_FOUND)
async def cancel_job(job_id: str, services: ServicesDep) -> JobStatus:
    """Cancel a queued or running job (finished jobs are left as they are)."""
    return JobStatus(**await run_in_threadpool(services.jobs.cancel, job_id))
