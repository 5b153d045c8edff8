"""The service's side of Ray: a local head when no cluster is given, and the runner that submits
queued jobs as Ray jobs (Ray Jobs API), reconciles the database with Ray's view, stops cancelled
jobs and reads their logs.

Run once, never twice: a job's Ray submission id is `sea-<job id>`, so Ray itself refuses a
second submission of the same job; a submission the service made but did not record before a
restart is found by that id and adopted. A running job Ray has no record of (its head was
replaced) is queued again and resumes from its saved work.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from ray.job_submission import JobStatus, JobSubmissionClient

from workers.jobstore import FINAL_STATES, BadTransition, Job, JobStore

log = logging.getLogger("sea_convert.orchestrator")

MAX_REQUEUES = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _auth_headers() -> dict:
    """Ray's token header when the cluster uses token authentication, as Ray's own job client sends it.
    Since Ray 2.5x a local head turns token mode on by itself once ~/.ray/auth_token exists (any
    ray.init() on the machine writes one); this process then follows the same rule, so its health
    checks and its JobSubmissionClient carry the token instead of getting 401s."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    except ImportError:  # a Ray without token authentication
        return {}
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return get_auth_headers_if_auth_enabled({})


def _alive(dashboard: str) -> bool:
    try:
        return httpx.get(f"{dashboard}/api/version", headers=_auth_headers(), timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# Ray drains a node on SIGTERM for up to 30 s, for Serve replicas to move; a head of the service runs only its
# jobs and is stopped when none is active, so an idle head would wait out the 30 s for nothing
HEAD_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


class LocalRayHead:
    """A Ray head on this machine, started by the service (`ray start --head --block` in its own
    session), recorded in `<state_dir>/ray-head.json` so a restarted service adopts it instead of
    starting a second one, and stopped with SIGTERM (Ray drains, then stops its processes)."""

    def __init__(self, state_dir: Path, num_cpus: int | None = None, num_gpus: int | None = None,
                 resources: dict[str, float] | None = None):
        self.state_dir = Path(state_dir)
        self.record = self.state_dir / "ray-head.json"
        self.num_cpus, self.num_gpus, self.resources = num_cpus, num_gpus, resources or {}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None

    def ensure(self, timeout: float = 120) -> tuple[str, bool]:
        """(dashboard address, adopted): an alive recorded head is adopted, else a new one starts."""
        rec = self._read()
        if rec and _alive(rec["dashboard"]):
            log.info("adopting the local Ray head at %s (pid %s)", rec["dashboard"], rec["pid"])
            return rec["dashboard"], True
        self.state_dir.mkdir(parents=True, exist_ok=True)
        gcs, dash = _free_port(), _free_port()
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={gcs}",
               f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--disable-usage-stats"]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        logfile = open(self.state_dir / "ray-head.log", "ab")
        # its own session: a Ctrl-C meant for the service does not reach the head (jobs keep running)
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env={**os.environ, **HEAD_ENV},
                                start_new_session=True)
        dashboard = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + timeout
        while not _alive(dashboard):
            if proc.poll() is not None:
                raise RuntimeError(f"the local Ray head exited ({proc.returncode}); see {self.state_dir / 'ray-head.log'}")
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"the local Ray head did not answer within {timeout:.0f} s")
            time.sleep(0.5)
        self.write_record(proc.pid, dashboard, f"127.0.0.1:{gcs}")
        log.info("started a local Ray head at %s (pid %d)", dashboard, proc.pid)
        return dashboard, False

    def write_record(self, pid: int, dashboard: str, gcs: str) -> None:
        """Record a head (the leader of its own process group) for `ensure` to adopt and `stop` to end."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "dashboard": dashboard, "gcs": gcs}))
        os.replace(tmp, self.record)

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM the head and wait for its process group to end (SIGKILL after `timeout`); False when there was none."""
        rec = self._read()
        if rec is None:
            return False
        try:
            # SIGTERM to `ray start --block` alone: it drains the node through the GCS, then stops the group's
            # processes itself. Signalled too, the GCS would die first and the drain wait out its 30 s.
            os.kill(rec["pid"], signal.SIGTERM)
        except ProcessLookupError:
            self.record.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.waitpid(rec["pid"], os.WNOHANG)  # reap it when this process started it (else a zombie lingers)
            except ChildProcessError:
                pass
            try:
                os.killpg(rec["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.3)
        else:
            os.killpg(rec["pid"], signal.SIGKILL)
        self.record.unlink(missing_ok=True)
        log.info("stopped the local Ray head (pid %s)", rec["pid"])
        return True


def submission_id(job_id: str) -> str:
    return f"sea-{job_id}"


@dataclass
class RunnerConfig:
    dashboard: str  # Ray dashboard address (http://host:8265): where the Jobs API lives
    database_url: str  # what the job's driver writes to
    output_root: Path
    python: str = "python"  # the interpreter on the cluster's nodes
    workdir: Path | None = None  # the driver's working folder (relative recipe paths); None: Ray's default


class RayRunner:
    """Submits, reconciles, cancels and reads logs of jobs through Ray's Jobs API."""

    def __init__(self, store: JobStore, config: RunnerConfig):
        self.store, self.config = store, config
        self.client = JobSubmissionClient(config.dashboard)

    # --- submit ----------------------------------------------------------------------------------

    def entrypoint(self, job_id: str) -> str:
        c = self.config
        cmd = f"{shlex.quote(c.python)} -m workers.ray_job --job-id {job_id} --output-root {shlex.quote(str(c.output_root))}"
        return f"cd {shlex.quote(str(c.workdir))} && {cmd}" if c.workdir is not None else cmd

    def submit(self, job: Job) -> str:
        sid = submission_id(job.id)
        try:
            self.client.submit_job(
                entrypoint=self.entrypoint(job.id), submission_id=sid,
                entrypoint_num_cpus=0,  # the driver only waits; the stage tasks ask for the recipe's resources
                metadata={"sea_convert_job": job.id, "name": job.name},
                runtime_env={"env_vars": {"SEA_CONVERT_DATABASE_URL": self.config.database_url}},
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
        for job in self.store.for_runner(("cancelled",), submitted=True, limit=50):
            info = self._info(job.ray_submission_id)
            if info is not None and not info.status.is_terminal():
                self.client.stop_job(job.ray_submission_id)  # cancelled while the service was down
                actions.append((job.id, "stopped"))
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
