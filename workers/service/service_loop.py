"""The service's timer: every few seconds reconcile jobs with Ray, fire due schedules, submit what
is queued. Runs in a thread beside the REST app; one bad tick is logged, never fatal."""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sea_convert.recipe import RecipeError
from sea_convert.recipe_json import load_recipe_json
from workers.service.jobstore import Job, JobStore, OutputBusy, Schedule
from workers.service.orchestrator import RayRunner
from workers.service.schedules import fire_due

log = logging.getLogger("sea_convert.service")


def submit_scheduled(store: JobStore, schedule: Schedule, key: str) -> Job | None:
    """A schedule's run: its stored recipe (checked and resolved when the schedule was made), re-read now
    (the job re-resolves model and data when it runs). None: an active job holds its output folder."""
    name, output_dir = schedule.name, None
    try:
        recipe = load_recipe_json(schedule.recipe, source=f"schedule {schedule.name}")
        name, output_dir = recipe.name, str(recipe.output.dir)
    except RecipeError:
        pass  # the job records the recipe error when it runs
    try:
        job, _created = store.submit(name, schedule.recipe, idempotency_key=key, schedule_id=schedule.id,
                                     submitted_by=f"schedule:{schedule.name}", output_dir=output_dir)
    except OutputBusy as err:
        log.warning("schedule %s skipped this run: %s", schedule.name, err)
        return None
    return job


class ServiceLoop:
    def __init__(self, store: JobStore, runner: RayRunner | None, interval_s: float = 2.0):
        self.store, self.runner, self.interval_s = store, runner, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self, now: dt.datetime | None = None) -> dict:
        now = now or dt.datetime.now(dt.timezone.utc)
        out: dict = {"reconciled": [], "fired": [], "submitted": []}
        if self.runner is not None:
            out["reconciled"] = self.runner.reconcile()
        out["fired"] = fire_due(self.store, now, lambda sched, key: submit_scheduled(self.store, sched, key))
        if self.runner is not None:
            out["submitted"] = self.runner.dispatch()
        for what in ("reconciled", "fired", "submitted"):
            if out[what]:
                log.info("%s: %s", what, out[what])
        return out

    def _run(self) -> None:
        while True:
            try:
                self.tick()  # the first tick runs at start-up: missed schedules fire once, now
            except Exception:  # noqa: BLE001
                log.exception("service tick failed; trying again in %.0f s", self.interval_s)
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sea-convert-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
