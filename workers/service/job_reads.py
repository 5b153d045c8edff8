"""Job reads for the REST service's status calls, apart from the writer, the service loop and Ray.

GET /v1/jobs/{id} and GET /v1/jobs are what clients poll, so they do not go through JobStore's ORM
sessions (a session per call, a threadpool hop per call, behind whatever else holds the threads):

- SQLite through the standard sqlite3 module (the default store): the read runs on the calling
  thread (the event loop's), on a read-only connection kept for it (PRAGMA query_only), with
  statements compiled once. In WAL mode a reader never waits for the writer, so a status read
  costs ~30 microseconds: less than the hop to a worker thread. Were the file busy all the same
  (rare in WAL mode: a crash recovery, a writer in exclusive locking mode), the read gives up
  after 50 ms and goes to the pool below, so the loop is never held longer than that.
- Any other database (PostgreSQL), and that fallback: a small thread pool of its own (2 threads)
  with its own connection pool, never Starlette's threadpool, where Ray calls (cancel, logs) run.

Nothing is cached: each read is one read transaction on the database, so it sees every commit
made before it, whoever made it (this service, its loop, a job driver in another process).

A job comes back as a JobRow: every column attribute of Job (taken from the mapper, so columns
added to Job come along with no change here) and `stages`, StageRows (every column of Stage) in
stage order: what JobOut.of reads from a Job. ORM properties and relationships other than
`stages` are not there.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from sqlalchemy import Integer, String, bindparam, create_engine, event, func, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Select

from workers.service.jobstore import JOB_STATES, Job, JobStoreError, Stage

INLINE_BUSY_TIMEOUT_S = 0.05  # the most an inline SQLite read may wait for a lock before going to the pool
POOL_THREADS = 2


class JobRow(SimpleNamespace):
    """A job as read: Job's column attributes, and `stages` (StageRow, in order)."""


class StageRow(SimpleNamespace):
    """A stage as read: Stage's column attributes."""


def _labelled(cls) -> list:
    """Every mapped column of an ORM class, labelled with its attribute name."""
    return [attr.columns[0].label(attr.key) for attr in sa_inspect(cls).column_attrs]


class _Statements:
    """The Core selects of the read path, built from the mappers when the first reader is made."""

    def __init__(self):
        jobs, stages = Job.__table__, Stage.__table__
        self.job = select(*_labelled(Job)).where(jobs.c.id == bindparam("id", type_=String))
        self.stages_of_job = (select(*_labelled(Stage)).where(stages.c.job_id == bindparam("id", type_=String))
                              .order_by(stages.c.position))
        self.stages_of_jobs = (select(*_labelled(Stage)).where(stages.c.job_id.in_(bindparam("ids", expanding=True)))
                               .order_by(stages.c.job_id, stages.c.position))
        self._jobs, self._stages = jobs, stages
        self._pages: dict[tuple[bool, bool, bool], tuple[Select, Select, Select]] = {}

    def page(self, status: bool, name: bool, schedule_id: bool) -> tuple[Select, Select, Select]:
        """(count, page of jobs, their stages) for a JobStore.list filter: newest first, then by id. The
        stages' select names the page as a subquery (SQLite, in one read transaction; Core reads use
        stages_of_jobs with the page's ids, as not every database takes LIMIT in an IN subquery)."""
        key = (status, name, schedule_id)
        if key not in self._pages:
            jobs, stages = self._jobs, self._stages
            where = []
            if status:
                where.append(jobs.c.status == bindparam("status", type_=String))
            if name:
                where.append(jobs.c.name == bindparam("name", type_=String))
            if schedule_id:
                where.append(jobs.c.schedule_id == bindparam("schedule_id", type_=String))
            count = select(func.count()).select_from(jobs).where(*where)
            ids = (select(jobs.c.id).where(*where).order_by(jobs.c.created_at.desc(), jobs.c.id)
                   .limit(bindparam("limit", type_=Integer)).offset(bindparam("offset", type_=Integer)))
            page = (select(*_labelled(Job)).where(*where).order_by(jobs.c.created_at.desc(), jobs.c.id)
                    .limit(bindparam("limit", type_=Integer)).offset(bindparam("offset", type_=Integer)))
            page_stages = (select(*_labelled(Stage)).where(stages.c.job_id.in_(ids.scalar_subquery()))
                           .order_by(stages.c.job_id, stages.c.position))
            self._pages[key] = (count, page, page_stages)
        return self._pages[key]


class _Sqlite:
    """A Core select compiled once for the sqlite3 module: its SQL, parameter order and column converters."""

    def __init__(self, stmt: Select, dialect):
        compiled = stmt.compile(dialect=dialect)
        self.sql, self.order = compiled.string, compiled.positiontup or []
        cols = list(stmt.selected_columns)
        self.keys = [c.key for c in cols]
        self.convert = [(i, proc) for i, c in enumerate(cols)
                        if (proc := c.type.dialect_impl(dialect).result_processor(dialect, None)) is not None]

    def rows(self, conn: sqlite3.Connection, params: dict) -> list[dict]:
        out = []
        for raw in conn.execute(self.sql, [params[k] for k in self.order]):
            values = list(raw)
            for i, proc in self.convert:
                if values[i] is not None:
                    values[i] = proc(values[i])
            out.append(dict(zip(self.keys, values)))
        return out


def _job_rows(jobs: list[dict], stages: list[dict]) -> list[JobRow]:
    by_job: dict[str, list[StageRow]] = {}
    for s in stages:  # ordered by job, then position
        by_job.setdefault(s["job_id"], []).append(StageRow(**s))
    return [JobRow(**j, stages=by_job.get(j["id"], [])) for j in jobs]


class JobReads:
    """The read path over a JobStore's database. One per process (the app makes it); thread-safe."""

    def __init__(self, engine: Engine, threads: int = POOL_THREADS):
        url, self._store_engine = engine.url, engine
        file_sqlite = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
        self.inline = file_sqlite and engine.dialect.driver == "pysqlite"
        if file_sqlite:  # a pool of read connections of its own, beside the writer's
            self.engine = create_engine(url, pool_size=threads, max_overflow=0,
                                        connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _read_only_sqlite)
        elif url.get_backend_name() == "sqlite":  # in memory: only the store's own connections see it
            self.engine = engine
        else:
            self.engine = create_engine(url, pool_size=threads, max_overflow=0, pool_pre_ping=True)
        self._q = _Statements()
        self._compiled: dict[int, _Sqlite] = {}
        self._idle: list[sqlite3.Connection] = []  # inline read connections not in use (one per concurrent reader)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sea-convert-reads")

    # --- reads, from async code: inline where that is cheaper than a hop, else the read pool ----------

    async def job(self, job_id: str) -> JobRow | None:
        """The job with its stages, or None."""
        if self.inline:
            try:
                return self._job_sqlite(job_id)
            except sqlite3.OperationalError as err:
                if not _busy(err):
                    raise  # the file is busy (locked): wait on the pool below, not on the loop
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.job_sync, job_id)

    async def jobs(self, status: str | None = None, name: str | None = None, schedule_id: str | None = None,
                   limit: int = 50, offset: int = 0) -> tuple[list[JobRow], int]:
        """A page of jobs as JobStore.list gives it (newest first) and the total count."""
        if status is not None and status not in JOB_STATES:
            raise JobStoreError(f"status must be one of {', '.join(JOB_STATES)}")
        args = (status, name, schedule_id, limit, offset)
        if self.inline:
            try:
                return self._jobs_sqlite(*args)
            except sqlite3.OperationalError as err:
                if not _busy(err):
                    raise
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.jobs_sync, *args)

    # --- through SQLAlchemy Core: any database ---------------------------------------------------------

    def job_sync(self, job_id: str) -> JobRow | None:
        with self.engine.connect() as conn:
            job = conn.execute(self._q.job, {"id": job_id}).mappings().first()
            if job is None:
                return None
            stages = conn.execute(self._q.stages_of_job, {"id": job_id}).mappings().all()
        return _job_rows([dict(job)], [dict(s) for s in stages])[0]

    def jobs_sync(self, status: str | None = None, name: str | None = None, schedule_id: str | None = None,
                  limit: int = 50, offset: int = 0) -> tuple[list[JobRow], int]:
        count, page, _ = self._q.page(status is not None, name is not None, schedule_id is not None)
        params = {"status": status, "name": name, "schedule_id": schedule_id, "limit": limit, "offset": offset}
        with self.engine.connect() as conn:
            total = conn.execute(count, params).scalar_one()
            jobs = [dict(r) for r in conn.execute(page, params).mappings()]
            ids = {"ids": [j["id"] for j in jobs]}
            stages = [dict(r) for r in conn.execute(self._q.stages_of_jobs, ids).mappings()] if jobs else []
        return _job_rows(jobs, stages), int(total)

    # --- SQLite, inline ------------------------------------------------------------------------------------

    def _sqlite(self, stmt: Select) -> _Sqlite:
        compiled = self._compiled.get(id(stmt))
        if compiled is None:
            compiled = self._compiled[id(stmt)] = _Sqlite(stmt, self.engine.dialect)
        return compiled

    def _open(self) -> sqlite3.Connection:
        cargs, ckwargs = self.engine.dialect.create_connect_args(self.engine.url)
        conn = sqlite3.connect(*cargs, **{**ckwargs, "timeout": INLINE_BUSY_TIMEOUT_S, "check_same_thread": False,
                                          "isolation_level": None})  # transactions: explicit, in _snapshot
        _read_only_sqlite(conn, None, busy_timeout_ms=int(INLINE_BUSY_TIMEOUT_S * 1000))
        return conn

    def _snapshot(self, read):
        """read(conn) in one read transaction (the job and its stages as of one commit), on an idle
        inline connection: the service's event loop reuses one; list.pop/append are atomic."""
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._open()
        try:
            conn.execute("BEGIN")
            try:
                result = read(conn)
            finally:
                conn.execute("ROLLBACK")
        except BaseException:
            conn.close()  # in an unknown state: not reused
            raise
        self._idle.append(conn)
        return result

    def _job_sqlite(self, job_id: str) -> JobRow | None:
        def read(conn):
            jobs = self._sqlite(self._q.job).rows(conn, {"id": job_id})
            return _job_rows(jobs, self._sqlite(self._q.stages_of_job).rows(conn, {"id": job_id}))[0] if jobs else None
        return self._snapshot(read)

    def _jobs_sqlite(self, status, name, schedule_id, limit, offset) -> tuple[list[JobRow], int]:
        count, page, page_stages = self._q.page(status is not None, name is not None, schedule_id is not None)
        params = {"status": status, "name": name, "schedule_id": schedule_id, "limit": limit, "offset": offset}

        def read(conn):
            total = next(iter(self._sqlite(count).rows(conn, params)[0].values()))
            jobs = self._sqlite(page).rows(conn, params)
            stages = self._sqlite(page_stages).rows(conn, params) if jobs else []
            return _job_rows(jobs, stages), int(total)
        return self._snapshot(read)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        while self._idle:
            self._idle.pop().close()
        if self.engine is not self._store_engine:
            self.engine.dispose()


def _busy(err: sqlite3.OperationalError) -> bool:
    name = getattr(err, "sqlite_errorname", "")  # Python 3.11+
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(err)


def _read_only_sqlite(conn, _record, busy_timeout_ms: int = 30000) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA query_only=ON")  # this connection never writes
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cur.close()
