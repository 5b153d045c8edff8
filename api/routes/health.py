"""Liveness and database reachability (no auth: for load balancers and probes)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import Store

router = APIRouter(tags=["health"])


@router.get("/health")
def health(store: Store) -> dict:
    with store.session() as s:
        s.execute(text("SELECT 1"))
    return {"status": "ok", "database": "ok"}
