"""Background jobs: read one, cancel one (the record lives in Redis, so any replica answers)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ..deps import StateDep
from ..errors import ApiError
from ..schemas import ErrorResponse, Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}


async def _get(state, job_id: str) -> dict:
    job = await run_in_threadpool(state.jobs.store.get, job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"job {job_id!r} does not exist (finished jobs expire after a week)")
    return job


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
