"""Request dependencies: the job store and bearer-token auth (401 without a valid token, 403 read-only)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from api.settings import Identity, Settings
from workers.service.jobstore import JobStore


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


MAX_TOKEN_BYTES = 4096


def _token(request: Request) -> bytes:
    # the header's raw bytes (Starlette decodes them as latin-1): any token, ASCII or not, compares as bytes
    header = request.headers.get("authorization", "").encode("latin-1")
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer" or not token or len(token) > MAX_TOKEN_BYTES:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    return token


async def require_read(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> Identity:
    """The caller's identity (401 without a valid token). Every token is compared, in constant time, so the
    time taken says nothing about which one nearly matched. Async (it does no I/O): a sync dependency
    costs each request a hop to Starlette's threadpool."""
    token = _token(request)
    found = None
    for ident in settings.identities():
        if secrets.compare_digest(token, ident.secret) and found is None:
            found = ident
    if found is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
    return found


async def require_write(caller: Annotated[Identity, Depends(require_read)]) -> Identity:
    if caller.role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token is read-only: it cannot submit, cancel or schedule")
    return caller


Store = Annotated[JobStore, Depends(get_store)]
Reader = Annotated[Identity, Depends(require_read)]
Writer = Annotated[Identity, Depends(require_write)]
