"""Service settings from the environment (SEA_CONVERT_*), validated once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEA_CONVERT_", extra="forbid")

    database_url: str = Field("sqlite:///sea-convert.db", description="any SQLAlchemy URL (PostgreSQL in production)")
    admin_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, description="bearer tokens that may submit and cancel (comma-separated)")
    read_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, description="bearer tokens that may only read (comma-separated)")
    output_root: Path = Field(Path("outputs"), description="every job's output.dir must lie inside this folder")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    runner: Literal["ray", "off"] = Field(
        "ray", description="ray: submit jobs to Ray and fire schedules; off: an API that only records jobs (a replica, tests)")
    ray_address: str | None = Field(
        None, description="the Ray cluster's dashboard address (http://head:8265); none: the service starts a local head")
    ray_num_cpus: int | None = Field(None, ge=0, description="CPUs the local head offers (default: all)")
    ray_num_gpus: int | None = Field(None, ge=0, description="GPUs the local head offers (default: all)")
    stop_local_ray: Literal["idle", "always", "never"] = Field(
        "idle", description="on shutdown, stop the local head: when no job is queued or running (they finish, and the"
        " next start adopts the head), always, or never")
    state_dir: Path = Field(Path(".sea-convert"), description="the service's own files: the local head's record and log")
    job_python: str | None = Field(None, description="interpreter for job drivers on the cluster; default: this one"
                                   " for a local head, `python` for a remote cluster")
    poll_interval_s: float = Field(2.0, gt=0, le=300, description="how often jobs are reconciled and schedules fired")

    @field_validator("admin_tokens", "read_tokens", mode="before")
    @classmethod
    def _comma_separated(cls, v):
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v
