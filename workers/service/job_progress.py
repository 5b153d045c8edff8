"""A job's progress on its record: the stage, step / total and an estimated end, written by the stage
task itself (a module of its own: the Ray job's driver runs as __main__, and what a stage task
unpickles must be importable on the worker)."""

from __future__ import annotations

import datetime as dt
import functools
import time
from dataclasses import dataclass, field

from workers.service.jobstore import JobStore


@dataclass
class ProgressSink:
    """Records a stage's step / total and an estimated end on the job, at most every `every_s` seconds.
    Picklable (a URL, not a connection), so the stage task writes it from whichever node runs it."""

    database_url: str
    job_id: str
    every_s: float = 2.0
    _last: float = 0.0
    _start: dict = field(default_factory=dict)  # stage -> (monotonic time, step) of its first report here

    def __call__(self, stage: str, step: int, total: int) -> None:
        now = time.monotonic()
        t0, step0 = self._start.setdefault(stage, (now, step))
        if now - self._last < self.every_s and step < total:
            return
        self._last = now
        wall = dt.datetime.now(dt.timezone.utc)
        eta = None
        if step > step0:
            eta = (wall + dt.timedelta(seconds=(total - step) * (now - t0) / (step - step0))).isoformat()
        _store(self.database_url).record(self.job_id, progress={
            "stage": stage, "step": step, "total": total, "updated_at": wall.isoformat(), "eta": eta})


@functools.cache
def _store(url: str) -> JobStore:
    return JobStore(url)
