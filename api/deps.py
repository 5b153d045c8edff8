"""Request dependencies: the job store and bearer-token auth (401 without a valid token, 403 read-only)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from api.settings import Settings
from workers.jobstore import JobStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def _token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    return token


def _matches(token: str, allowed: list[str]) -> bool:
    return any(secrets.compare_digest(token, a) for a in allowed)  # constant time


def require_read(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str:
    token = _token(request)
    if _matches(token, settings.admin_tokens):
        return "admin"
    if _matches(token, settings.read_tokens):
        return "read"
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


def require_write(role: Annotated[str, Depends(require_read)]) -> str:
    if role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token is read-only: it cannot submit, cancel or schedule")
    return role


Store = Annotated[JobStore, Depends(get_store)]
Reader = Annotated[str, Depends(require_read)]
Writer = Annotated[str, Depends(require_write)]
