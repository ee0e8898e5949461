"""``/v1/jobs``: submit, follow, page through files, cancel.

Routes are plain functions: FastAPI runs them in its thread pool, so store and broker calls
never block the event loop. Enqueuing a job's files runs as a background task after the 202.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, Response, status

from ..deps import ServicesDep
from ..enqueue import InvalidSubmission, submit_job
from ..schemas import JobRequest
from ..views import NotFound, cancel_job, file_list, job_detail, job_list

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

FileState = Literal["pending", "queued", "running", "done", "failed", "cancelled"]


def _not_found(exc: NotFound) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))


@router.post("", status_code=status.HTTP_202_ACCEPTED)
def create_job(body: JobRequest, background: BackgroundTasks, response: Response,
               services: ServicesDep) -> dict:
    """Queue a job. 403 for any path outside the allowed roots, 422 for bad input, 503 when
    the broker is down; in every such case nothing is stored or queued."""
    try:
        job_id = submit_job(services.store, services.celery, services.settings,
                            **body.submit_kwargs(), source="api", defer=background.add_task)
    except (InvalidSubmission, FileNotFoundError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return {"job_id": job_id, "state": "expanding"}


@router.get("")
def list_jobs(services: ServicesDep, limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0)] = 0, counts: bool = False) -> dict:
    """Jobs, newest first; ``counts=true`` adds files per state."""
    return job_list(services.store, limit=limit, offset=offset, counts=counts)


@router.get("/{job_id}")
def get_job(job_id: str, services: ServicesDep) -> dict:
    """The job, its files per state, audio seconds done, throughput and ETA."""
    try:
        return job_detail(services.store, job_id)
    except NotFound as exc:
        raise _not_found(exc) from None


@router.get("/{job_id}/files")
def list_files(job_id: str, services: ServicesDep, state: FileState | None = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0)] = 0, tokens: bool = True) -> dict:
    """The job's files in id order: text and sound tokens of done ones (``tokens=false``
    leaves the long token strings out), errors of failed ones."""
    try:
        return file_list(services.store, job_id, state=state, limit=limit, offset=offset,
                         tokens=tokens)
    except NotFound as exc:
        raise _not_found(exc) from None


@router.delete("/{job_id}")
def delete_job(job_id: str, services: ServicesDep) -> dict:
    """Cancel what has not started; running files finish."""
    try:
        return cancel_job(services.store, job_id)
    except NotFound as exc:
        raise _not_found(exc) from None
