"""Background jobs: list them, read one, cancel one (the records live in Redis, so any replica answers)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from ..deps import StateDep
from ..errors import ApiError
from ..schemas import ErrorResponse, Job, JobList

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}


async def _get(state, job_id: str) -> dict:
    job = await run_in_threadpool(state.jobs.store.get, job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"job {job_id!r} does not exist (finished jobs expire after a week)")
    return job


@router.get("", response_model=JobList, responses={422: {"model": ErrorResponse}})
async def list_jobs(
    state: StateDep,
    gallery: Annotated[str | None, Query(description="only this gallery's jobs")] = None,
    kind: Annotated[Literal["adapt", "activate", "import"] | None, Query(description="only this kind")] = None,
    status: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                      Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="jobs per page")] = 50,
    cursor: Annotated[str | None, Query(description="the previous page's next_cursor")] = None,
) -> JobList:
    """Jobs newest first (finished ones are kept a week), filtered by every parameter given; one page of at most
    ``limit``, and ``next_cursor`` for the next (null on the last)."""
    try:
        jobs, next_cursor = await run_in_threadpool(state.jobs.store.list, gallery, kind, status, limit, cursor)
    except ValueError:
        raise ApiError(422, "invalid_cursor", f"cursor {cursor!r} is not a next_cursor of this listing") from None
    return JobList(jobs=[Job(**job) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=Job, responses=_ERRORS)
async def get_job(job_id: str, state: StateDep) -> Job:
    return Job(**await _get(state, job_id))


@router.delete("/{job_id}", response_model=Job, responses=_ERRORS)
async def cancel_job(job_id: str, state: StateDep) -> Job:
    """Cancel a queued or running job (its subprocess is killed); answers the job, now ``cancelled``."""
    await _get(state, job_id)
    if not await run_in_threadpool(state.jobs.cancel, job_id):
        job = await _get(state, job_id)
        raise ApiError(409, "job_not_running", f"job {job_id} has already {job['status']}")
    return Job(**await _get(state, job_id))
