"""Nightly re-distillation: cron schedules with a time zone, fired by the service.

`fire_due` is called by the service's timer (and once at start-up). For each enabled schedule it
finds the latest cron time in (last fired, now]: several missed times fire once, not once each.
A schedule whose previous job is still queued or running is skipped for that time (runs never
stack). The submission's idempotency key is the schedule and the cron time, so a service that
restarts between submitting and recording the fire cannot submit the same run twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from workers.service.jobstore import Job, JobStore, Schedule


class ScheduleError(ValueError):
    pass


def check_schedule(cron: str, timezone: str) -> None:
    """Raise ScheduleError naming the field when the cron string or the time zone is not valid."""
    if not croniter.is_valid(cron):
        raise ScheduleError(f"cron: {cron!r} is not a valid cron expression (e.g. '0 2 * * *' for 02:00 daily)")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"timezone: unknown time zone {timezone!r} (e.g. 'UTC', 'Europe/Paris')") from None


def latest_due(cron: str, timezone: str, since: dt.datetime, now: dt.datetime) -> dt.datetime | None:
    """The latest cron time t with since < t <= now (in UTC), or None."""
    tz = ZoneInfo(timezone)
    # get_prev is strictly before its start: start one second after now so a time exactly at now is due
    start = (now + dt.timedelta(seconds=1)).astimezone(tz).replace(microsecond=0)
    t = croniter(cron, start).get_prev(dt.datetime).astimezone(dt.timezone.utc)
    if t > now:
        return None
    return t if t > since else None


@dataclass
class Fired:
    schedule: str
    at: dt.datetime
    job_id: str | None  # None: skipped, the previous run of this schedule is still active
    skipped: bool


def fire_due(store: JobStore, now: dt.datetime, submit: Callable[[Schedule, str], Job | None]) -> list[Fired]:
    """Submit every schedule that is due. `submit(schedule, idempotency_key)` creates the job."""
    fired = []
    for sched in store.schedules(enabled_only=True):
        since = sched.last_fired_at or sched.created_at  # aware: the job store's times come back in UTC
        at = latest_due(sched.cron, sched.timezone, since, now)
        if at is None:
            continue
        key = f"schedule:{sched.id}:{at.isoformat()}"
        already = store.by_key(key)
        if already is not None:  # submitted before a restart, not yet recorded: that is this run
            store.mark_fired(sched.id, at)
            fired.append(Fired(sched.name, at, already.id, False))
            continue
        if store.has_active_job(sched.id):
            store.mark_fired(sched.id, at)
            fired.append(Fired(sched.name, at, None, True))
            continue
        job = submit(sched, key)  # None: another active job holds the output folder; this firing is skipped
        store.mark_fired(sched.id, at)
        fired.append(Fired(sched.name, at, job.id if job is not None else None, job is None))
    return fired
