"""Job state in real databases (a SQLite file, and a PostgreSQL server on loopback where the machine
has one): idempotent submissions under a concurrent burst, transitions, filters and pagination, the
runner's queries and re-queueing, and state that survives a restart (a new JobStore on the same URL)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from workers.service.jobstore import BadTransition, JobStore, JobStoreError, UnknownJob


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(db_url):
    return JobStore(db_url)


def test_submit_creates_a_queued_job_with_its_stages(store):
    job, created = store.submit("smollm2", "name: smollm2\n")
    assert created and job.status == "queued" and len(job.id) == 32
    assert [s.name for s in job.stages] == ["distill", "validate", "publish"]
    assert all(s.status == "pending" and s.attempts == 0 for s in job.stages)


def test_a_burst_of_submissions_is_recorded_once_per_key(store):
    keys = [f"key-{i % 50}" for i in range(100)]  # every key sent twice, all at once

    def send(key):
        job, created = store.submit("burst", f"name: {key}\n", idempotency_key=key)
        return key, job.id, created

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, keys))
    ids_by_key = {}
    for key, job_id, _ in results:
        ids_by_key.setdefault(key, set()).add(job_id)
    assert all(len(ids) == 1 for ids in ids_by_key.values())  # the same key always gets the same job
    assert sum(created for *_, created in results) == 50
    jobs, total = store.list(name="burst", limit=1000)
    assert total == 50 and len({j.id for j in jobs}) == 50  # none lost, none duplicated


def test_transitions_and_final_states(store):
    job, _ = store.submit("t", "x")
    store.set_stage(job.id, "distill", "running")
    running = store.set_status(job.id, "running", ray_submission_id="raysubmit_1")
    assert running.started_at is not None and running.ray_submission_id == "raysubmit_1"
    done = store.set_status(job.id, "succeeded", metrics={"ppl_ratio": 1.1}, artifact_uri="s3://b/v1")
    assert done.finished_at is not None and done.metrics == {"ppl_ratio": 1.1}
    with pytest.raises(BadTransition, match="is succeeded; it cannot become running"):
        store.set_status(job.id, "running")
    stage = store.get(job.id).stages[0]
    assert stage.attempts == 1 and stage.status == "running"
    with pytest.raises(UnknownJob, match="unknown job id 'nope'"):
        store.get("nope")
    with pytest.raises(JobStoreError, match="unknown job field"):
        store.set_status(job.id, "succeeded", recipe="changed")


def test_filters_pagination_and_restart(db_url):
    url = db_url
    store = JobStore(url)
    ids = [store.submit("a" if i % 2 else "b", "x")[0].id for i in range(7)]
    store.set_status(ids[0], "running")
    page1, total = store.list(limit=3)
    page2, _ = store.list(limit=3, offset=3)
    page3, _ = store.list(limit=3, offset=6)
    assert total == 7 and len(page1) == 3 and len(page2) == 3 and len(page3) == 1
    assert len({j.id for j in page1 + page2 + page3}) == 7
    assert store.list(status="running")[1] == 1 and store.list(name="a")[1] == 3
    with pytest.raises(JobStoreError, match="status must be one of"):
        store.list(status="exploded")
    again = JobStore(url)  # the service restarted: everything is still there
    assert again.get(ids[0]).status == "running" and again.list()[1] == 7


def test_runner_queries_record_and_requeue(store):
    a, _ = store.submit("a", "x")
    b, _ = store.submit("b", "x")
    assert [j.id for j in store.for_runner(("queued",), submitted=False)] == [a.id, b.id]  # oldest first
    store.record(a.id, ray_submission_id=f"sea-{a.id}", log_uri="http://head/logs")
    assert [j.id for j in store.for_runner(("queued",), submitted=False)] == [b.id]
    assert store.get(a.id).status == "queued"  # recording a submission does not move the status
    store.set_status(a.id, "running")
    assert [j.id for j in store.for_runner(("queued", "running"), submitted=True)] == [a.id]
    again = store.requeue(a.id, "Ray has no record of it")
    assert again.status == "queued" and again.ray_submission_id is None and again.metrics["requeued"] == 1
    store.set_status(b.id, "cancelled")
    with pytest.raises(BadTransition, match="cannot be queued again"):
        store.requeue(b.id, "no")
    with pytest.raises(JobStoreError, match="unknown job field"):
        store.record(a.id, status="succeeded")


NEWER_COLUMNS = ("submitted_by", "cancelled_by", "active_output", "progress", "work_cleared")


def test_a_database_from_an_older_version_gets_the_newer_columns(db_url):
    """A job table as an older sea-convert made it (without the audit, output, progress and cleanup columns):
    opening it adds them, and its jobs stay readable."""
    from sqlalchemy import inspect, text

    old = JobStore(db_url)
    job, _ = old.submit("before", "name: before\n")
    with old.engine.begin() as conn:
        conn.execute(text("DROP INDEX ux_jobs_active_output"))
        conn.execute(text("DROP INDEX ix_jobs_submitted_by"))
        for column in NEWER_COLUMNS:
            conn.execute(text(f"ALTER TABLE jobs DROP COLUMN {column}"))
    assert not set(NEWER_COLUMNS) & {c["name"] for c in inspect(old.engine).get_columns("jobs")}
    old.engine.dispose()
    store = JobStore(db_url)
    assert set(NEWER_COLUMNS) <= {c["name"] for c in inspect(store.engine).get_columns("jobs")}
    assert store.get(job.id).name == "before" and store.get(job.id).submitted_by is None
    store.submit("after", "name: after\n", submitted_by="ops", output_dir="/o/a")
    with pytest.raises(JobStoreError, match="being written by job"):  # the unique index is back too
        store.submit("again", "name: again\n", output_dir="/o/a")
