"""Service settings from the environment (SEA_CONVERT_*), validated once at start-up."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from sea_convert.recipe_policy import RecipePolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEA_CONVERT_", extra="forbid")

    database_url: str = Field("sqlite:///sea-convert.db", description="any SQLAlchemy URL (PostgreSQL in production)")
    admin_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, description="bearer tokens that may submit and cancel (comma-separated)")
    read_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, description="bearer tokens that may only read (comma-separated)")
    output_root: Path = Field(Path("outputs"), description="every path a submitted recipe writes (output, state, local"
                              " publish and checkpoint targets) lies inside this folder")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("data")], description="folders a submitted recipe may read (model folders, text"
        " files, harness tasks; comma-separated); installed model packages are always readable")
    allowed_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="object-storage endpoints a recipe may name besides the provider's own"
        " (comma-separated URLs, e.g. http://127.0.0.1:9000 for a MinIO on loopback)")
    hub_patterns: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"], description="hub models and datasets a recipe may load (comma-separated globs,"
        " e.g. HuggingFaceTB/*,Salesforce/wikitext; empty: no hub access)")
    max_steps: int = Field(100_000, ge=1, description="largest steps (and warmup) of a training stage")
    max_seq_len: int = Field(131_072, ge=16, description="largest seq_len, eval ctx, predictor and block lengths")
    max_batch_size: int = Field(1024, ge=1, description="largest batch size of any stage")
    max_tokens: int = Field(10_000_000_000, ge=16, description="largest token or document count a recipe may ask to read")
    max_cpus: float | None = Field(None, gt=0, description="most CPUs a stage may ask for (none: whatever a node has)")
    max_gpus: float | None = Field(None, ge=0, description="most GPUs (or training workers) a stage may ask for")
    max_memory_gb: float | None = Field(None, gt=0, description="most host memory a stage may ask for")
    max_active_jobs: int = Field(20, ge=1, description="queued + running jobs one token may have (more: 429)")
    max_submissions_per_minute: int = Field(30, ge=1, description="submissions one token may make a minute (more: 429)")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    runner: Literal["ray", "off"] = Field(
        "ray", description="ray: submit jobs to Ray and fire schedules; off: an API that only records jobs (a replica, tests)")
    ray_address: str | None = Field(
        None, description="the Ray cluster's dashboard address (http://head:8265); none: the service starts a local head")
    ray_autoscales: bool = Field(
        False, description="the cluster at ray_address adds nodes on demand: a stage that no node can run yet is"
        " left to its autoscaler (otherwise it fails at once, naming the resource)")
    ray_num_cpus: int | None = Field(None, ge=0, description="CPUs the local head offers (default: all)")
    ray_num_gpus: int | None = Field(None, ge=0, description="GPUs the local head offers (default: all)")
    stop_local_ray: Literal["idle", "always", "never"] = Field(
        "idle", description="on shutdown, stop the local head: when no job is queued or running (they finish, and the"
        " next start adopts the head), always, or never")
    state_dir: Path = Field(Path(".sea-convert"), description="the service's own files: the local head's record and log")
    job_python: str | None = Field(None, description="interpreter for job drivers on the cluster; default: this one"
                                   " for a local head, `python` for a remote cluster")
    poll_interval_s: float = Field(2.0, gt=0, le=300, description="how often jobs are reconciled and schedules fired")

    @field_validator("admin_tokens", "read_tokens", "data_roots", "allowed_endpoints", "hub_patterns", mode="before")
    @classmethod
    def _comma_separated(cls, v):
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    def identities(self) -> list[Identity]:
        """Every token with its name and role. A token is `name:secret` (the name goes in the audit
        trail) or a bare secret, then named by its role and position (admin-1, read-2)."""
        out = []
        for role, tokens in (("admin", self.admin_tokens), ("read", self.read_tokens)):
            for i, entry in enumerate(tokens, 1):
                name, sep, secret = entry.partition(":")
                if not sep or not TOKEN_NAME.match(name) or not secret:
                    name, secret = f"{role}-{i}", entry
                out.append(Identity(name, role, secret.encode()))
        return out

    def recipe_policy(self) -> RecipePolicy:
        """What a submitted recipe may touch (checked while it is validated; see sea_convert.recipe_policy)."""
        maxima = {k: getattr(self, k) for k in ("max_steps", "max_seq_len", "max_batch_size", "max_tokens", "max_cpus",
                                                "max_gpus", "max_memory_gb") if getattr(self, k) is not None}
        return RecipePolicy(read_roots=tuple(self.data_roots), write_root=self.output_root,
                            allowed_endpoints=tuple(self.allowed_endpoints), hub_patterns=tuple(self.hub_patterns),
                            maxima=maxima)


TOKEN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,39}$")


@dataclass(frozen=True)
class Identity:
    name: str  # recorded with the jobs it submits or cancels; never the secret
    role: str  # admin | read
    secret: bytes = field(repr=False)
