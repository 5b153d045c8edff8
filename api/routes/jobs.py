"""Jobs: validate a recipe, submit, list, get, cancel, artifacts."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from api.deps import Reader, Store, Writer
from api.quotas import check_quota
from api.recipe_body import RECIPE_BODY, read_recipe
from workers.service.jobstore import FINAL_STATES, JOB_STATES, BadTransition, Job, OutputBusy, UnknownJob

router = APIRouter(prefix="/v1", tags=["jobs"])
log = logging.getLogger("sea_convert.api")


class StageOut(BaseModel):
    name: str
    status: str
    attempts: int
    error: str | None
    started_at: str | None  # ISO 8601 in UTC: each stage's own wall time, beside the job's
    finished_at: str | None


class JobOut(BaseModel):
    id: str
    name: str
    status: str
    error: str | None
    metrics: dict
    progress: dict | None  # {stage, step, total, updated_at, eta} while a stage trains
    artifact_uri: str | None
    log_uri: str | None  # this API's logs route (the cluster's own address is not for clients)
    schedule_id: str | None
    submitted_by: str | None  # the submitting token's name (settings), never the token
    cancelled_by: str | None
    created_at: str  # ISO 8601 in UTC, with its zone
    started_at: str | None
    finished_at: str | None
    stages: list[StageOut]

    @classmethod
    def of(cls, job: Job) -> "JobOut":
        iso = lambda t: t.isoformat() if t is not None else None  # noqa: E731
        return cls(id=job.id, name=job.name, status=job.status, error=job.error, metrics=job.metrics or {},
                   progress=job.progress, artifact_uri=job.artifact_uri,
                   log_uri=f"/v1/jobs/{job.id}/logs" if job.ray_submission_id else None, schedule_id=job.schedule_id,
                   submitted_by=job.submitted_by, cancelled_by=job.cancelled_by,
                   created_at=iso(job.created_at), started_at=iso(job.started_at), finished_at=iso(job.finished_at),
                   stages=[StageOut(name=s.name, status=s.status, attempts=s.attempts, error=s.error,
                                    started_at=iso(s.started_at), finished_at=iso(s.finished_at)) for s in job.stages])


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
        return store.get(store.resolve_id(job_id))
    except UnknownJob as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None


@router.post("/recipes/validate", response_model=Validated, openapi_extra=RECIPE_BODY)
async def validate_recipe(request: Request, _: Reader) -> Validated:
    """Check a recipe (YAML, or JSON with Content-Type application/json) without running anything."""
    recipe, _text = await read_recipe(request, request.app.state.settings)
    return Validated(valid=True, name=recipe.name, mode=recipe.sea.mode,
                     stages=["a"] + (["b"] if recipe.distill.stage_b else []))


@router.post("/jobs", response_model=JobOut, status_code=status.HTTP_201_CREATED, openapi_extra=RECIPE_BODY,
             responses={409: {"description": "an active job writes to the same output.dir"},
                        429: {"description": "this token's quota is used up (see Retry-After)"}})
async def submit(request: Request, response: Response, store: Store, caller: Writer,
                 idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    """Queue a conversion. The same Idempotency-Key returns the first job (200) instead of a second one."""
    settings = request.app.state.settings
    recipe, text = await read_recipe(request, settings)
    if idempotency_key is not None and (first := await run_in_threadpool(store.by_key, idempotency_key)) is not None:
        response.status_code = status.HTTP_200_OK  # a replay is not a new submission: no quota spent
        return JobOut.of(first)
    await run_in_threadpool(check_quota, store, settings, caller)
    try:
        job, created = await run_in_threadpool(lambda: store.submit(
            recipe.name, text, idempotency_key=idempotency_key, submitted_by=caller.name,
            output_dir=str(recipe.output.dir)))
    except OutputBusy as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    if not created:
        response.status_code = status.HTTP_200_OK
    return JobOut.of(job)


# The status reads run on the event loop: JobReads (workers/service/job_reads.py) reads SQLite inline in tens
# of microseconds, or waits on a read pool of its own for another database; never on the writer's
# sessions, the service loop or Ray.
@router.get("/jobs", response_model=JobPage)
async def list_jobs(
        request: Request, _: Reader,
        status_: Annotated[str | None, Query(alias="status", pattern="^(" + "|".join(JOB_STATES) + ")$")] = None,
        name: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> JobPage:
    jobs, total = await request.app.state.reads.jobs(status=status_, name=name, limit=limit, offset=offset)
    return JobPage(items=[JobOut.of(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(job_id: str, request: Request, store: Store, _: Reader) -> JobOut:
    job = await request.app.state.reads.job(job_id)
    if job is None and len(job_id) < 32:  # the start of an id, as the CLI shows it
        try:
            job = await request.app.state.reads.job(await run_in_threadpool(store.resolve_id, job_id))
        except UnknownJob as err:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(UnknownJob(f"unknown job id {job_id!r}")))
    return JobOut.of(job)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
async def cancel(job_id: str, request: Request, store: Store, caller: Writer) -> JobOut:
    """Record the job cancelled, then stop its Ray job (driver and stage tasks). Were Ray out of
    reach now, the service loop stops it later: the record decides."""
    job = _job(store, job_id)
    if job.status in FINAL_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is already {job.status}")
    try:
        job = store.set_status(job.id, "cancelled", cancelled_by=caller.name)
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
def artifacts(job_id: str, request: Request, store: Store, _: Reader) -> dict:
    """Where the checkpoint went and what it holds: the published URI and version, the manifest (every
    file's size and sha256), and, when the checkpoint folder is on this server, a download route per file."""
    job = _job(store, job_id)
    metrics = job.metrics or {}
    manifest = metrics.get("manifest")
    local = _local_checkpoint(job, request.app.state.settings.output_root) is not None
    files = [{**f, "download": f"/v1/jobs/{job.id}/artifacts/files/{f['path']}" if local else None}
             for f in (manifest or {}).get("files", [])]
    return {"job": job.id, "status": job.status, "artifact_uri": job.artifact_uri, "published": metrics.get("published"),
            "content_hash": (manifest or {}).get("content_hash"), "files": files,
            "log": f"/v1/jobs/{job.id}/logs" if job.ray_submission_id else None}


@router.get("/jobs/{job_id}/artifacts/files/{path:path}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def download(job_id: str, path: str, request: Request, store: Store, _: Reader) -> FileResponse:
    """One file of the job's checkpoint, streamed, with its sha256 (from the manifest) in `Repr-Digest`."""
    job = _job(store, job_id)
    folder = _local_checkpoint(job, request.app.state.settings.output_root)
    entry = next((f for f in ((job.metrics or {}).get("manifest") or {}).get("files", []) if f["path"] == path), None)
    if folder is None or entry is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no file {path!r} on this server")
    target = (folder / entry["path"]).resolve()
    if folder not in target.parents or not target.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no file {path!r} on this server")
    digest = base64.b64encode(bytes.fromhex(entry["sha256"])).decode()
    return FileResponse(target, filename=target.name, media_type="application/octet-stream",
                        headers={"Repr-Digest": f"sha-256=:{digest}:", "X-Checksum-SHA256": entry["sha256"]})


def _local_checkpoint(job: Job, output_root: Path) -> Path | None:
    """The succeeded job's checkpoint folder when it is on this server, inside the output root."""
    checkpoint = (job.metrics or {}).get("checkpoint")
    if job.status != "succeeded" or not checkpoint:
        return None
    folder = Path(checkpoint).resolve()
    return folder if output_root.resolve() in folder.parents and folder.is_dir() else None
