"""What runs beside the REST app: the Ray head (local, or a cluster's address), the job runner and
the service loop. Started by the app's lifespan, stopped cleanly with it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from api.settings import Settings
from workers.service.jobstore import JobStore
from workers.service.orchestrator import RayRunner, RunnerConfig
from workers.service.ray_head import LocalRayHead
from workers.service.service_loop import ServiceLoop

log = logging.getLogger("sea_convert.service")


class Runtime:
    def __init__(self, settings: Settings, store: JobStore):
        self.settings, self.store = settings, store
        self.head: LocalRayHead | None = None
        self.runner: RayRunner | None = None
        self.loop: ServiceLoop | None = None

    def start(self) -> None:
        s = self.settings
        if s.runner == "ray":
            dashboard, token_file = s.ray_address, None  # a cluster's token: Ray's RAY_AUTH_* variables
            if dashboard is None:  # a head of our own: loopback only, with the token it was started (or adopted) with
                self.head = LocalRayHead(s.state_dir, s.ray_num_cpus, s.ray_num_gpus)
                dashboard, _adopted = self.head.ensure()
                token_file = self.head.recorded_token_file()
            local = s.ray_address is None
            workdir = None
            if local:  # an empty folder: a recipe's paths are absolute by now, and no hub name can match a local folder
                workdir = (s.state_dir / "jobs-cwd").resolve()
                workdir.mkdir(parents=True, exist_ok=True)
            self.runner = RayRunner(self.store, RunnerConfig(
                dashboard=dashboard, database_url=_absolute_sqlite(s.database_url), output_root=s.output_root.resolve(),
                python=s.job_python or (sys.executable if local else "python"), workdir=workdir,
                auth_token_file=token_file, autoscaling=s.ray_autoscales and not local))
        self.loop = ServiceLoop(self.store, self.runner, s.poll_interval_s)
        self.loop.start()

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()
        if self.head is None or self.settings.stop_local_ray == "never":
            return
        active = self.store.list(status="running", limit=1)[1] + self.store.list(status="queued", limit=1)[1]
        if self.settings.stop_local_ray == "idle" and active:
            log.warning("%d job(s) queued or running: the local Ray head stays up for them; the next start adopts it", active)
            return
        self.head.stop()


def _absolute_sqlite(url: str) -> str:
    """A relative SQLite path means the service's folder, wherever the job driver runs."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite://":
        return prefix + str(Path(url[len(prefix):]).resolve())
    return url
