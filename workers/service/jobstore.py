"""Job state in a real database through SQLAlchemy: a SQLite file by default, any SQLAlchemy URL by setting.

Tables: jobs (one conversion: its recipe, status, Ray submission, metrics, artifact and log
locations), stages (distill / validate / publish of a job, with attempts and errors) and
schedules (cron + time zone + recipe). A submission may carry an idempotency key: the same key
returns the job it first created, even when two requests race (a unique constraint decides).
Status changes follow `TRANSITIONS`; a finished job never changes again.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text, TypeDecorator, create_engine, event, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

JOB_STATES = ("queued", "running", "succeeded", "failed", "gated", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "gated", "cancelled"})
TRANSITIONS = {
    "queued": {"running", "failed", "cancelled"},
    "running": {"succeeded", "failed", "gated", "cancelled", "queued"},  # -> queued: its cluster lost it (reconcile)
}
STAGES = ("distill", "validate", "publish")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """A UTC time that comes back with its zone (SQLite keeps none; every time here is written in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=dt.timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_id)
    name: Mapped[str] = mapped_column(String(100), index=True)
    # the validated recipe as JSON, paths resolved (sea_convert.recipe_json; rows before 2026-12-05: the YAML sent)
    recipe: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    ray_submission_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    schedule_id: Mapped[str | None] = mapped_column(ForeignKey("schedules.id"), nullable=True, index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    artifact_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    log_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=_now, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # the audit trail: names of the tokens (from the service settings, never the tokens) that acted
    submitted_by: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    cancelled_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # the resolved output folder while the job is queued or running (NULL after): one active job per folder
    active_output: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {stage, step, total, updated_at, eta}
    # the service has removed the ended job's work folder (its runner looks at each ended job once)
    work_cleared: Mapped[bool | None] = mapped_column(nullable=True)
    stages: Mapped[list[Stage]] = relationship(back_populates="job", cascade="all, delete-orphan", order_by="Stage.position")

    __table_args__ = (Index("ux_jobs_active_output", "active_output", unique=True),)


class Stage(Base):
    __tablename__ = "stages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(16))
    position: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    job: Mapped[Job] = relationship(back_populates="stages")


class Schedule(Base):
    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    cron: Mapped[str] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    recipe: Mapped[str] = mapped_column(Text)  # as a job's recipe
    enabled: Mapped[bool] = mapped_column(default=True)
    last_fired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=_now)


class JobStoreError(ValueError):
    pass


class UnknownJob(JobStoreError):
    pass


class BadTransition(JobStoreError):
    pass


class OutputBusy(JobStoreError):
    """Another queued or running job writes to the same output folder."""


SETTABLE_FIELDS = ("ray_submission_id", "metrics", "artifact_uri", "log_uri", "cancelled_by", "progress", "work_cleared")


def _set_fields(job: Job, fields: dict) -> None:
    for key, value in fields.items():
        if key not in SETTABLE_FIELDS:
            raise JobStoreError(f"unknown job field {key!r}")
        setattr(job, key, value)


class JobStore:
    """The database behind the service. One instance per process; sessions are short-lived."""

    def __init__(self, url: str = "sqlite:///sea-convert.db"):
        kwargs = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(conn, _record):  # concurrent readers with one writer; enforce foreign keys
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        Base.metadata.create_all(self.engine)
        self._add_missing_columns()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _add_missing_columns(self) -> None:
        """A database made by an older version: its tables get the columns added since (all nullable)."""
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in inspect(self.engine).get_columns(table.name)}
            with self.engine.begin() as conn:
                for column in table.columns:
                    if column.name not in have:
                        kind = column.type.compile(dialect=self.engine.dialect)
                        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
                for index in table.indexes:
                    index.create(conn, checkfirst=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def submit(self, name: str, recipe: str, idempotency_key: str | None = None, schedule_id: str | None = None,
               submitted_by: str | None = None, output_dir: str | None = None) -> tuple[Job, bool]:
        """(job, created). With a key already used, the first job is returned and nothing is written.
        OutputBusy when another active job holds `output_dir` (a unique index decides a race)."""
        if idempotency_key is not None:
            existing = self.by_key(idempotency_key)
            if existing is not None:
                return existing, False
        try:
            with self.session() as s:
                job = Job(name=name, recipe=recipe, idempotency_key=idempotency_key, schedule_id=schedule_id, metrics={},
                          submitted_by=submitted_by, active_output=output_dir)
                job.stages = [Stage(name=n, position=i) for i, n in enumerate(STAGES)]
                s.add(job)
            return self.get(job.id), True
        except IntegrityError:
            existing = self.by_key(idempotency_key) if idempotency_key is not None else None
            if existing is not None:
                return existing, False  # a concurrent request with the same key won the race
            holder = self.holder_of(output_dir) if output_dir is not None else None
            if holder is not None:
                raise OutputBusy(f"output.dir {output_dir} is being written by job {holder.id} ({holder.status});"
                                 " wait for it to end, cancel it, or choose another output.dir") from None
            raise

    def holder_of(self, output_dir: str) -> Job | None:
        """The queued or running job writing to this output folder, if any."""
        with self.session() as s:
            return s.scalar(select(Job).where(Job.active_output == output_dir))

    def active_count(self, submitted_by: str) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(
                Job.submitted_by == submitted_by, Job.status.in_(("queued", "running")))))

    def submitted_since(self, submitted_by: str, since: dt.datetime) -> list[dt.datetime]:
        """When this token's submissions since `since` were made, oldest first (the per-minute quota)."""
        with self.session() as s:
            return list(s.scalars(select(Job.created_at).where(Job.submitted_by == submitted_by, Job.created_at >= since)
                                  .order_by(Job.created_at)))

    def by_key(self, key: str) -> Job | None:
        """The job first submitted with this idempotency key, if any."""
        with self.session() as s:
            job = s.scalar(select(Job).where(Job.idempotency_key == key))
            if job is not None:
                _ = job.stages  # load before the session closes
            return job

    def resolve_id(self, job_id: str) -> str:
        """A whole id, or a unique start of one (the CLI shows 12 hex digits): the whole id, else UnknownJob."""
        if len(job_id) >= 32 or not (6 <= len(job_id) and all(c in "0123456789abcdef" for c in job_id)):
            return job_id
        with self.session() as s:
            found = list(s.scalars(select(Job.id).where(Job.id.startswith(job_id, autoescape=True)).limit(2)))
        if len(found) != 1:
            raise UnknownJob(f"job id {job_id!r} matches {'no job' if not found else 'several jobs'}"
                             + ("" if not found else ": give more of it"))
        return found[0]

    def get(self, job_id: str) -> Job:
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise UnknownJob(f"unknown job id {job_id!r}")
            _ = job.stages
            return job

    def list(self, status: str | None = None, name: str | None = None, schedule_id: str | None = None,
             limit: int = 50, offset: int = 0) -> tuple[list[Job], int]:
        """Newest first, with the total count for pagination."""
        if status is not None and status not in JOB_STATES:
            raise JobStoreError(f"status must be one of {', '.join(JOB_STATES)}")
        with self.session() as s:
            q = select(Job)
            if status is not None:
                q = q.where(Job.status == status)
            if name is not None:
                q = q.where(Job.name == name)
            if schedule_id is not None:
                q = q.where(Job.schedule_id == schedule_id)
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            jobs = list(s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)))
            for j in jobs:
                _ = j.stages
            return jobs, int(total)

    def set_status(self, job_id: str, status: str, *, error: str | None = None, **fields) -> Job:
        """Move a job along TRANSITIONS (a finished job never moves); extra fields: ray_submission_id,
        metrics, artifact_uri, log_uri."""
        with self.session() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                raise UnknownJob(f"unknown job id {job_id!r}")
            if status != job.status:
                if status not in TRANSITIONS.get(job.status, set()):
                    raise BadTransition(f"job {job_id} is {job.status}; it cannot become {status}")
                job.status = status
                if status == "running":
                    job.started_at = _now()
                if status in FINAL_STATES:
                    job.finished_at = _now()
                    job.active_output = None  # the folder is free for the next job
                    for stage in job.stages if status in ("cancelled", "failed") else ():  # none still says running
                        if stage.status in ("running", "pending"):
                            stage.status = ("cancelled" if status == "cancelled" else "failed") if stage.status == "running" else "skipped"
                            stage.finished_at = job.finished_at
            if error is not None:
                job.error = error
            _set_fields(job, fields)
        return self.get(job_id)

    def record(self, job_id: str, **fields) -> None:
        """Set ray_submission_id / log_uri / artifact_uri / metrics without touching the status."""
        with self.session() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                raise UnknownJob(f"unknown job id {job_id!r}")
            _set_fields(job, fields)

    def for_runner(self, statuses: tuple[str, ...], submitted: bool, limit: int = 500,
                   cleared: bool | None = None) -> list[Job]:
        """Jobs in these states with (or without) a Ray submission, oldest first: what the runner
        dispatches (queued, not submitted) and what it reconciles with Ray (submitted); `cleared=False`:
        only ended jobs whose work folder the runner has not dealt with yet."""
        with self.session() as s:
            q = select(Job).where(Job.status.in_(statuses))
            q = q.where(Job.ray_submission_id.is_not(None) if submitted else Job.ray_submission_id.is_(None))
            if cleared is False:
                q = q.where(Job.work_cleared.is_(None))
            jobs = list(s.scalars(q.order_by(Job.created_at, Job.id).limit(limit)))
            for j in jobs:
                _ = j.stages
            return jobs

    def requeue(self, job_id: str, reason: str) -> Job:
        """A running job its cluster has no record of (the head was replaced): queue it again. The
        resubmitted run resumes from its saved work and training state; the count is kept in metrics."""
        with self.session() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                raise UnknownJob(f"unknown job id {job_id!r}")
            if job.status not in ("queued", "running"):
                raise BadTransition(f"job {job_id} is {job.status}; it cannot be queued again")
            job.status, job.ray_submission_id, job.error = "queued", None, reason
            job.metrics = {**(job.metrics or {}), "requeued": int((job.metrics or {}).get("requeued", 0)) + 1}
        return self.get(job_id)

    def set_stage(self, job_id: str, stage: str, status: str, error: str | None = None) -> None:
        if stage not in STAGES:
            raise JobStoreError(f"stage must be one of {', '.join(STAGES)}")
        with self.session() as s:
            row = s.scalar(select(Stage).where(Stage.job_id == job_id, Stage.name == stage))
            if row is None:
                raise UnknownJob(f"unknown job id {job_id!r}")
            row.status = status
            if status == "running":
                row.attempts += 1
                row.started_at = _now()
            if status in ("succeeded", "failed", "skipped"):
                row.finished_at = _now()
            if error is not None:
                row.error = error

    # --- schedules -------------------------------------------------------------------------------

    def add_schedule(self, name: str, cron: str, timezone: str, recipe: str) -> Schedule:
        try:
            with self.session() as s:
                sched = Schedule(name=name, cron=cron, timezone=timezone, recipe=recipe)
                s.add(sched)
            return sched
        except IntegrityError:
            raise JobStoreError(f"a schedule named {name!r} exists already") from None

    def schedules(self, enabled_only: bool = False) -> list[Schedule]:
        with self.session() as s:
            q = select(Schedule).order_by(Schedule.created_at, Schedule.id)
            if enabled_only:
                q = q.where(Schedule.enabled.is_(True))
            return list(s.scalars(q))

    def delete_schedule(self, schedule_id: str) -> None:
        with self.session() as s:
            sched = s.get(Schedule, schedule_id)
            if sched is None:
                raise UnknownJob(f"unknown schedule id {schedule_id!r}")
            s.delete(sched)

    def mark_fired(self, schedule_id: str, at: dt.datetime) -> None:
        with self.session() as s:
            sched = s.get(Schedule, schedule_id)
            if sched is not None:
                sched.last_fired_at = at

    def has_active_job(self, schedule_id: str) -> bool:
        with self.session() as s:
            q = select(func.count()).select_from(Job).where(
                Job.schedule_id == schedule_id, Job.status.in_(("queued", "running")))
            return bool(s.scalar(q))
