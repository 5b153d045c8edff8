"""What every recipe section is built from: the strict base model, the recipe errors, and the field
checks that apply the service's policy (paths it may read or write, storage targets, upper bounds)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

from sea_convert.recipe_paths import READ_FROM_RECIPE_FOLDER, resolve_input_path, without_marks
from sea_convert.recipe_policy import RecipePolicy


class RecipeError(ValueError):
    """A recipe that cannot be used. `str()` is a message for a person, naming the field path."""


class MalformedRecipe(RecipeError):
    """Recipe text that is not YAML (or JSON): `str()` says where, without naming the source."""


def _takes_bool(annotation) -> bool:
    return annotation is bool or (get_origin(annotation) in (Union, type(int | None)) and bool in get_args(annotation))


class _Strict(BaseModel):
    # no NaN or infinity for any float: `lr: .inf` is an error, not a run that learns nothing
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info: ValidationInfo):
        # pydantic takes `steps: true` as 1; a boolean is never a number in a recipe
        annotation = without_marks(cls.model_fields[info.field_name].annotation)
        if isinstance(v, bool) and not _takes_bool(annotation) and annotation is not Any:
            raise ValueError(f"expected {getattr(annotation, '__name__', annotation)}, got a boolean ({v})")
        return v


def _policy(info: ValidationInfo) -> RecipePolicy | None:
    """The service's rules for a recipe from a client (None: the local CLI, which may touch anything)."""
    return (info.context or {}).get("policy")


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """A path the recipe reads: relative to the recipe file's folder, or under the service's data roots."""
    if (policy := _policy(info)) is not None:
        return policy.readable(path)
    base = (info.context or {}).get("base_dir")
    return resolve_input_path(path, base) if base is not None else path.expanduser()


# A file or folder the recipe reads. The type marks the field (the CLI resolves such fields before
# sending a recipe: sea_convert.recipe_paths) and resolves it, before the field's own checks run.
InputPath = Annotated[Path, READ_FROM_RECIPE_FOLDER, AfterValidator(_resolve)]


def _output_path(path: str | Path | None, info: ValidationInfo) -> Path | None:
    """A path the recipe writes: relative to the cwd, or inside the service's output root."""
    if path is None:
        return None
    if (policy := _policy(info)) is not None:
        return policy.writable(Path(path))
    return Path(path).expanduser()


def _at_most(key: str):
    """A field validator: the value stays under the service's maximum `key` (no bound locally)."""
    def check(cls, v, info: ValidationInfo):
        policy = _policy(info)
        return v if policy is None else policy.at_most(v, key)
    return classmethod(check)


def _hub_name(v: str | None, info: ValidationInfo) -> str | None:
    policy = _policy(info)
    return v if v is None or policy is None else policy.hub(v)


def _storage_uri(v: str | None, info: ValidationInfo) -> str | None:
    """s3://bucket/prefix or a local folder (file:// or a plain path): no other scheme, no fsspec chaining
    (`ftp::/x` has no '://' but opens FTP), no '..'."""
    if v is None:
        return None
    scheme = v.split("://", 1)[0] if "://" in v else ""
    if scheme not in ("", "s3", "file") or "::" in v or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:(?!//)", v):
        raise ValueError(f"{v!r}: use s3://bucket/prefix or a local folder (no other scheme, no '::' chaining)")
    if scheme == "s3" and not v[len("s3://"):].strip("/"):
        raise ValueError("s3:// needs a bucket: s3://bucket/prefix")
    if ".." in v.replace("\\", "/").split("/"):
        raise ValueError("'..' is not allowed in a storage URI")
    policy = _policy(info)
    return v if policy is None else policy.storage_target(v)


def _storage_options(v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    policy = _policy(info)
    return v if policy is None else policy.storage_options(v)
