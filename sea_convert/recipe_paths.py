"""Which recipe fields name files the recipe reads, and what a relative one means: the recipe file's folder.

The fields say so themselves: their type carries `READ_FROM_RECIPE_FOLDER` (`sea_convert.recipe.InputPath`).
So `load_recipe` (while validating) and the CLI's `submit` (before sending, without validating: the
model and data may exist only on the server) resolve the same fields the same way, and a new input
field needs no second list to be kept in step.
"""

from __future__ import annotations

import copy
import functools
import operator
import types
import typing
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel


class _ReadFromRecipeFolder:
    """The mark on a path field's type: a relative value is relative to the recipe file's folder."""

    def __repr__(self) -> str:
        return "READ_FROM_RECIPE_FOLDER"


READ_FROM_RECIPE_FOLDER = _ReadFromRecipeFolder()


def resolve_input_path(path: str | Path, base_dir: Path) -> Path:
    """`path` as the recipe in `base_dir` means it: whole and normalised (recipes/../../data/x.txt names one file)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path(base_dir) / p).resolve()


def _parts(annotation) -> Iterator:
    """The annotation and, through unions and Annotated, every type inside it."""
    yield annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            yield from _parts(arg)


def without_marks(annotation):
    """The annotation as a person reads it: Annotated's marks and validators dropped (Path | None)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return without_marks(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, map(without_marks, typing.get_args(annotation)))
    return annotation


def _is_input(field) -> bool:
    marks = list(field.metadata) + [m for a in _parts(field.annotation) if typing.get_origin(a) is typing.Annotated
                                    for m in a.__metadata__]
    return any(m is READ_FROM_RECIPE_FOLDER for m in marks)


def _submodel(field) -> type[BaseModel] | None:
    return next((a for a in _parts(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def input_path_fields(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """The dotted names (as a recipe spells them) of every input path field of `model`: what the CLI resolves,
    listed (tests/test_recipe_json.py holds it equal to the fields load_recipe resolves)."""
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        if _is_input(field):
            yield key
        elif (sub := _submodel(field)) is not None:
            yield from input_path_fields(sub, key + ".")


def with_input_paths_resolved(data: dict, model: type[BaseModel], base_dir: Path) -> dict:
    """A copy of raw recipe data (not validated) with its relative input paths made absolute against
    `base_dir`; anything that is not a string where a path goes is left for validation to judge."""
    data = copy.deepcopy(data)
    _resolve_in(data, model, Path(base_dir))
    return data


def _resolve_in(data: dict, model: type[BaseModel], base_dir: Path) -> None:
    for name, field in model.model_fields.items():
        for key in {field.alias or name, name}:  # populate_by_name: either spelling may be used
            value = data.get(key)
            if _is_input(field) and isinstance(value, str):
                data[key] = str(resolve_input_path(value, base_dir))
            elif isinstance(value, dict) and (sub := _submodel(field)) is not None:
                _resolve_in(value, sub, base_dir)
