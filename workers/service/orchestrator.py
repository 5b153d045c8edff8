"""The service's side of Ray jobs: the runner that submits queued jobs through Ray's Jobs API, reconciles
the database with Ray's view, stops cancelled jobs and reads their logs (the local head: ray_head.py).

Run once, never twice: a job's Ray submission id is `sea-<job id>`, so Ray itself refuses a
second submission of the same job; a submission the service made but did not record before a
restart is found by that id and adopted. A running job Ray has no record of (its head was
replaced) is queued again and resumes from its saved work.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from workers.pipeline.job_paths import remove_work, stored_work_dir
from workers.service.jobstore import FINAL_STATES, BadTransition, Job, JobStore
from workers.service.ray_head import bearer

log = logging.getLogger("sea_convert.orchestrator")

MAX_REQUEUES = 3


def submission_id(job_id: str) -> str:
    return f"sea-{job_id}"


@dataclass
class RunnerConfig:
    dashboard: str  # Ray dashboard address (http://host:8265): where the Jobs API lives
    database_url: str  # what the job's driver writes to
    output_root: Path
    python: str = "python"  # the interpreter on the cluster's nodes
    workdir: Path | None = None  # the driver's working folder (relative recipe paths); None: Ray's default
    # the local head's token file (LocalRayHead.token_file), sent as the dashboard's Authorization header; None:
    # Ray's own rules (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH in this process's environment)
    auth_token_file: Path | None = None
    autoscaling: bool = False  # the cluster adds nodes on demand (workers.service.ray_job.check_feasible defers to it)


class RayRunner:
    """Submits, reconciles, cancels and reads logs of jobs through Ray's Jobs API."""

    def __init__(self, store: JobStore, config: RunnerConfig):
        self.store, self.config = store, config
        headers = bearer(config.auth_token_file) if config.auth_token_file is not None else None
        self.client = JobSubmissionClient(config.dashboard, headers=headers)

    # --- submit ----------------------------------------------------------------------------------

    def entrypoint(self, job_id: str) -> str:
        c = self.config
        cmd = f"{shlex.quote(c.python)} -m workers.service.ray_job --job-id {job_id} --output-root {shlex.quote(str(c.output_root))}"
        return f"cd {shlex.quote(str(c.workdir))} && {cmd}" if c.workdir is not None else cmd

    def submit(self, job: Job) -> str:
        sid = submission_id(job.id)
        try:
            self.client.submit_job(
                entrypoint=self.entrypoint(job.id), submission_id=sid,
                entrypoint_num_cpus=0,  # the driver only waits; the stage tasks ask for the recipe's resources
                metadata={"sea_convert_job": job.id, "name": job.name},
                runtime_env={"env_vars": {"SEA_CONVERT_DATABASE_URL": self.config.database_url,
                                          "SEA_CONVERT_AUTOSCALING": "1" if self.config.autoscaling else "0"}},
            )
            log.info("submitted job %s as Ray job %s", job.id, sid)
        except RuntimeError as err:
            if "already exists" not in str(err):
                raise
            log.info("Ray already has %s (submitted before a restart): adopting it", sid)
        self.store.record(job.id, ray_submission_id=sid, log_uri=f"{self.config.dashboard}/api/jobs/{sid}/logs")
        return sid

    def dispatch(self) -> list[str]:
        """Submit every queued job that has no Ray submission yet; a refused one stays queued."""
        done = []
        for job in self.store.for_runner(("queued",), submitted=False):
            try:
                done.append(self.submit(job))
            except RuntimeError as err:  # e.g. the head's agent is not up yet: the next tick retries
                log.warning("could not submit job %s yet: %s", job.id, err)
        return done

    # --- reconcile -------------------------------------------------------------------------------

    def _info(self, sid: str):
        try:
            return self.client.get_job_info(sid)
        except RuntimeError as err:
            if "does not exist" in str(err) or "404" in str(err):
                return None
            raise

    def _tail(self, sid: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.client.get_job_logs(sid).splitlines()[-lines:])
        except RuntimeError:
            return ""

    def reconcile(self) -> list[tuple[str, str]]:
        """Bring the database in line with Ray's view; returns (job id, what was done)."""
        actions = []
        for job in self.store.for_runner(("queued", "running"), submitted=True):
            info = self._info(job.ray_submission_id)
            if info is None:
                requeued = int((job.metrics or {}).get("requeued", 0))
                if requeued >= MAX_REQUEUES:
                    self._final(job, "failed", f"Ray lost this job {requeued + 1} times (was its head replaced?)")
                    actions.append((job.id, "failed: lost"))
                else:
                    self.store.requeue(job.id, f"Ray has no record of {job.ray_submission_id}; queued again")
                    actions.append((job.id, "requeued"))
                continue
            if not info.status.is_terminal():
                continue
            fresh = self.store.get(job.id)  # the driver may have finished it while we looked
            if fresh.status in FINAL_STATES:
                continue
            if info.status == JobStatus.STOPPED:
                self._final(job, "cancelled", "stopped in Ray")
            elif info.status == JobStatus.FAILED:
                self._final(job, "failed", f"Ray job failed: {info.message}\n{self._tail(job.ray_submission_id)}")
            else:
                self._final(job, "failed", "the Ray job ended without recording a result")
            actions.append((job.id, f"ray {info.status.value.lower()}"))
        for job in self.store.for_runner(tuple(FINAL_STATES), submitted=True, limit=50, cleared=False):
            info = self._info(job.ray_submission_id)
            if info is not None and not info.status.is_terminal():
                if job.status == "cancelled":
                    self.client.stop_job(job.ray_submission_id)  # cancelled while the service was down
                    actions.append((job.id, "stopped"))
                continue
            # its driver is gone (a stopped driver never reaches its own cleanup): its work folder goes now
            work = stored_work_dir(job.recipe, self.config.output_root)
            if work is not None and remove_work(work, owner=job.id):
                actions.append((job.id, "work folder removed"))
            self.store.record(job.id, work_cleared=True)
        return actions

    def _final(self, job: Job, status: str, error: str) -> None:
        try:
            self.store.set_status(job.id, status, error=error)
        except BadTransition:
            pass

    # --- cancel and logs -------------------------------------------------------------------------

    def stop(self, job: Job) -> bool:
        if job.ray_submission_id is None:
            return False
        info = self._info(job.ray_submission_id)
        return info is not None and not info.status.is_terminal() and self.client.stop_job(job.ray_submission_id)

    def logs(self, job: Job) -> str:
        if job.ray_submission_id is None:
            return ""
        try:
            return self.client.get_job_logs(job.ray_submission_id)
        except RuntimeError:
            return ""

    async def follow(self, job: Job) -> AsyncIterator[str]:
        """The whole log so far, then new lines as they come, until the Ray job ends."""
        if job.ray_submission_id is None:
            return
        async for chunk in self.client.tail_job_logs(job.ray_submission_id):
            yield chunk
