"""The REST service: `create_app(settings)` builds the FastAPI app (routes, store, auth)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.routes import health, jobs, schedules
from api.runtime import Runtime
from api.settings import Settings
from workers.service.job_reads import JobReads
from workers.service.jobstore import JobStore


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    store = JobStore(settings.database_url)
    runtime = Runtime(settings, store)
    reads = JobReads(store.engine)  # the status reads: their own connections, off the writer, the loop and Ray

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()  # Ray head (or the cluster's address), the runner, the loop
        try:
            yield
        finally:
            runtime.stop()
            reads.close()

    app = FastAPI(title="sea-convert", version="0.1.0", lifespan=lifespan,
                  description="Convert pretrained transformer LMs to SEA attention: submit recipes, follow jobs, get checkpoints.")
    app.state.settings = settings
    app.state.store = store
    app.state.reads = reads
    app.state.runtime = runtime
    for module in (health, jobs, schedules):
        app.include_router(module.router)
    return app
