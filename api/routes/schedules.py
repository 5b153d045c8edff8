"""Schedules: nightly (or any cron) re-distillation of a recipe, in a time zone."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, Field

from api.deps import Reader, Store, Writer
from api.recipe_body import RECIPE_BODY, read_recipe
from workers.service.jobstore import JobStoreError, UnknownJob
from workers.service.schedules import check_schedule

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])


class ScheduleOut(BaseModel):
    id: str
    name: str
    cron: str
    timezone: str
    enabled: bool
    last_fired_at: str | None


class ScheduleIn(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    cron: str = Field(max_length=100)
    timezone: str = Field("UTC", max_length=64)


def _out(s) -> ScheduleOut:
    return ScheduleOut(id=s.id, name=s.name, cron=s.cron, timezone=s.timezone, enabled=s.enabled,
                       last_fired_at=s.last_fired_at.isoformat() if s.last_fired_at else None)


@router.post("", response_model=ScheduleOut, status_code=status.HTTP_201_CREATED, openapi_extra=RECIPE_BODY)
async def create(request: Request, store: Store, _: Writer, name: str, cron: str, timezone: str = "UTC") -> ScheduleOut:
    """The recipe is the body (YAML or JSON); name, cron and timezone are query parameters."""
    try:
        params = ScheduleIn(name=name, cron=cron, timezone=timezone)
        check_schedule(params.cron, params.timezone)
    except ValueError as err:  # ScheduleError, or the parameters' own validation
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from None
    _recipe, text = await read_recipe(request, request.app.state.settings)
    try:
        return _out(store.add_schedule(params.name, params.cron, params.timezone, text))
    except JobStoreError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None


@router.get("", response_model=list[ScheduleOut])
def list_schedules(store: Store, _: Reader) -> list[ScheduleOut]:
    return [_out(s) for s in store.schedules()]


@router.delete("/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete(schedule_id: str, store: Store, _: Writer) -> None:
    try:
        store.delete_schedule(schedule_id)
    except UnknownJob as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
