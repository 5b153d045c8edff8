"""Per-token quotas on submissions: queued + running jobs, and submissions a minute (429 + Retry-After).

Counted in the job database, so every replica of the API sees the same numbers."""

from __future__ import annotations

import datetime as dt
import math

from fastapi import HTTPException, status

from api.settings import Identity, Settings
from workers.service.jobstore import JobStore

WINDOW = dt.timedelta(minutes=1)


def check_quota(store: JobStore, settings: Settings, caller: Identity, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.timezone.utc)
    active = store.active_count(caller.name)
    if active >= settings.max_active_jobs:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"token {caller.name!r} has {active} jobs queued or running (the limit is"
                            f" {settings.max_active_jobs}): wait for one to end or cancel one",
                            headers={"Retry-After": str(max(1, math.ceil(settings.poll_interval_s)))})
    recent = store.submitted_since(caller.name, now - WINDOW)
    if len(recent) >= settings.max_submissions_per_minute:
        # the oldest submission in the window leaves it first
        wait = (recent[-settings.max_submissions_per_minute] + WINDOW - now).total_seconds()
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"token {caller.name!r} made {len(recent)} submissions in the last minute (the limit is"
                            f" {settings.max_submissions_per_minute})", headers={"Retry-After": str(max(1, math.ceil(wait)))})
