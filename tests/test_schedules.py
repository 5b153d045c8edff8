"""Nightly schedules: cron with a time zone, a missed run fires once, overlapping runs are skipped, a
restart cannot fire the same run twice, bad cron strings and zones are named."""

import datetime as dt

import pytest

from workers.service.jobstore import JobStore
from workers.service.schedules import ScheduleError, check_schedule, fire_due, latest_due

UTC = dt.timezone.utc


def test_latest_due_in_a_time_zone():
    # 02:00 in Paris is 01:00 UTC in winter
    since = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    assert latest_due("0 2 * * *", "Europe/Paris", since, dt.datetime(2026, 11, 21, 0, 59, tzinfo=UTC)) is None
    assert latest_due("0 2 * * *", "Europe/Paris", since, dt.datetime(2026, 11, 21, 1, 0, tzinfo=UTC)) == \
        dt.datetime(2026, 11, 21, 1, 0, tzinfo=UTC)  # exactly at the time: due
    # three nights missed -> only the latest one
    assert latest_due("0 2 * * *", "Europe/Paris", since, dt.datetime(2026, 11, 23, 9, 0, tzinfo=UTC)) == \
        dt.datetime(2026, 11, 23, 1, 0, tzinfo=UTC)


@pytest.mark.parametrize("cron,tz,field", [("61 * * * *", "UTC", "cron"), ("every night", "UTC", "cron"),
                                           ("0 2 * * *", "Mars/Olympus", "timezone")])
def test_bad_schedules_are_named(cron, tz, field):
    with pytest.raises(ScheduleError, match=f"^{field}:"):
        check_schedule(cron, tz)


def _submitter(store):
    def submit(sched, key):
        return store.submit(f"nightly-{sched.name}", sched.recipe, idempotency_key=key, schedule_id=sched.id)[0]
    return submit


def test_missed_runs_fire_once_overlaps_skip_and_restarts_do_not_double(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = JobStore(url)
    sched = store.add_schedule("smollm2", "0 2 * * *", "UTC", "name: smollm2\n")
    with store.session() as s:  # created three days ago
        s.get(type(sched), sched.id).created_at = dt.datetime(2026, 11, 19, 12, 0, tzinfo=UTC)
    now = dt.datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
    first = fire_due(store, now, _submitter(store))
    assert len(first) == 1 and not first[0].skipped and first[0].at == dt.datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
    assert fire_due(store, now, _submitter(store)) == []  # nothing new is due
    # next night, while the first run is still going: skipped, not stacked
    later = dt.datetime(2026, 11, 23, 2, 5, tzinfo=UTC)
    second = fire_due(store, later, _submitter(store))
    assert second[0].skipped and store.list(schedule_id=sched.id)[1] == 1
    # a service that submitted but died before recording the fire: the same run is not submitted twice
    store.set_status(first[0].job_id, "running")
    store.set_status(first[0].job_id, "succeeded")
    third_night = dt.datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    job = _submitter(store)(sched, f"schedule:{sched.id}:{third_night.isoformat()}")
    restarted = JobStore(url)
    again = fire_due(restarted, third_night, _submitter(restarted))
    assert again[0].job_id == job.id and restarted.list(schedule_id=sched.id)[1] == 2
