"""The REST service: `create_app(settings)` builds the FastAPI app (routes, store, auth)."""

from __future__ import annotations

from fastapi import FastAPI

from api.routes import health, jobs, schedules
from api.settings import Settings
from workers.jobstore import JobStore


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="sea-convert", version="0.1.0",
                  description="Convert pretrained transformer LMs to SEA attention: submit recipes, follow jobs, get checkpoints.")
    app.state.settings = settings
    app.state.store = JobStore(settings.database_url)
    for module in (health, jobs, schedules):
        app.include_router(module.router)
    return app
