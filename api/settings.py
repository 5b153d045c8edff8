"""Service settings from the environment (SEA_CONVERT_*), validated once at start-up."""

from __future__ import annotations

from pathlib import Path

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
    ray_address: str | None = Field(None, description="Ray cluster address; none: the service starts a local head")

    @field_validator("admin_tokens", "read_tokens", mode="before")
    @classmethod
    def _comma_separated(cls, v):
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v
