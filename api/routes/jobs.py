"""Jobs: validate a recipe, submit, list, get, cancel, artifacts."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from api.deps import Reader, Store, Writer
from api.recipe_body import RECIPE_BODY, read_recipe
from workers.jobstore import FINAL_STATES, JOB_STATES, BadTransition, Job, UnknownJob

router = APIRouter(prefix="/v1", tags=["jobs"])
log = logging.getLogger("sea_convert.api")


class StageOut(BaseModel):
    name: str
    status: str
    attempts: int
    error: str | None


class JobOut(BaseModel):
    id: str
    name: str
    status: str
    error: str | None
    metrics: dict
    artifact_uri: str | None
    log_uri: str | None
    schedule_id: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    stages: list[StageOut]

    @classmethod
    def of(cls, job: Job) -> "JobOut":
        iso = lambda t: t.isoformat() if t is not None else None  # noqa: E731
        return cls(id=job.id, name=job.name, status=job.status, error=job.error, metrics=job.metrics or {},
                   artifact_uri=job.artifact_uri, log_uri=job.log_uri, schedule_id=job.schedule_id,
                   created_at=iso(job.created_at), started_at=iso(job.started_at), finished_at=iso(job.finished_at),
                   stages=[StageOut(name=s.name, status=s.status, attempts=s.attempts, error=s.error) for s in job.stages])


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class Validated(BaseModel):
    valid: bool
    name: str
    mode: str
    stages: list[str]


def _job(store, job_id: str) -> Job:
    try:
        return store.get(job_id)
    except UnknownJob as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None


@router.post("/recipes/validate", response_model=Validated, openapi_extra=RECIPE_BODY)
async def validate_recipe(request: Request, _: Reader) -> Validated:
    """Check a recipe (YAML, or JSON with Content-Type application/json) without running anything."""
    recipe, _text = await read_recipe(request, request.app.state.settings)
    return Validated(valid=True, name=recipe.name, mode=recipe.sea.mode,
                     stages=["a"] + (["b"] if recipe.distill.stage_b else []))


@router.post("/jobs", response_model=JobOut, status_code=status.HTTP_201_CREATED, openapi_extra=RECIPE_BODY)
async def submit(request: Request, response: Response, store: Store, _: Writer,
                 idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    """Queue a conversion. The same Idempotency-Key returns the first job (200) instead of a second one."""
    recipe, text = await read_recipe(request, request.app.state.settings)
    job, created = store.submit(recipe.name, text, idempotency_key=idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    return JobOut.of(job)


@router.get("/jobs", response_model=JobPage)
def list_jobs(store: Store, _: Reader,
              status_: Annotated[str | None, Query(alias="status", pattern="^(" + "|".join(JOB_STATES) + ")$")] = None,
              name: Annotated[str | None, Query(max_length=100)] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> JobPage:
    jobs, total = store.list(status=status_, name=name, limit=limit, offset=offset)
    return JobPage(items=[JobOut.of(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, store: Store, _: Reader) -> JobOut:
    return JobOut.of(_job(store, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
async def cancel(job_id: str, request: Request, store: Store, _: Writer) -> JobOut:
    """Record the job cancelled, then stop its Ray job (driver and stage tasks). Were Ray out of
    reach now, the service loop stops it later: the record decides."""
    job = _job(store, job_id)
    if job.status in FINAL_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is already {job.status}")
    try:
        job = store.set_status(job_id, "cancelled")
    except BadTransition as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    runner = request.app.state.runtime.runner
    if runner is not None:
        try:
            await run_in_threadpool(runner.stop, job)
        except Exception as err:  # noqa: BLE001
            log.warning("job %s cancelled; stopping its Ray job failed for now (%s): the loop retries", job_id, err)
    return JobOut.of(job)


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}}, 409: {"description": "this service runs no jobs"}})
async def logs(job_id: str, request: Request, store: Store, _: Reader,
               follow: Annotated[bool, Query(description="keep the connection open and stream new lines until the job ends")] = False):
    """The job's log (its Ray job's driver and stage tasks). With follow, a queued job's log starts when it starts."""
    job = _job(store, job_id)
    runner = request.app.state.runtime.runner
    if runner is None:
        raise HTTPException(status.HTTP_409_CONFLICT, "this service runs no jobs (runner: off), so it has no logs")
    if not follow:
        return PlainTextResponse(await run_in_threadpool(runner.logs, job))

    async def stream():
        current = job
        while current.ray_submission_id is None and current.status not in FINAL_STATES:
            await asyncio.sleep(1.0)
            current = await run_in_threadpool(store.get, job_id)
        if current.ray_submission_id is None:
            yield f"job {job_id} is {current.status}; it never ran\n"
            return
        async for chunk in runner.follow(current):
            yield chunk

    return StreamingResponse(stream(), media_type="text/plain")


@router.get("/jobs/{job_id}/artifacts")
def artifacts(job_id: str, store: Store, _: Reader) -> dict:
    job = _job(store, job_id)
    return {"job": job.id, "status": job.status, "artifact_uri": job.artifact_uri, "log_uri": job.log_uri}
