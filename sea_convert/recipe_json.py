"""The validated recipe as JSON: what the service stores for a job or a schedule, and what a training
worker process receives. Written by `recipe_json` once the recipe is validated at its entry point (its
paths already resolved, so what runs is what was checked); read back by `load_recipe_json` alone.

Loading validates again (a model folder or text file may have gone since), but parses no YAML.
Versions before 2026-12-05 stored the client's YAML text instead; such a job or schedule still loads
(text that is not JSON goes through the entry points' parser, `recipe_data`), so an upgrade loses none.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from sea_convert.recipe import OutputConfig, Recipe, RecipeError, describe_validation_error, recipe_data

Model = TypeVar("Model", bound=BaseModel)


def recipe_json(recipe: Recipe) -> str:
    """The stored form: the model's JSON, by alias (`validate`, as a recipe spells it)."""
    return recipe.model_dump_json(by_alias=True)


def _validate_stored(model: type[Model], text: str) -> Model:
    try:
        return model.model_validate_json(text)
    except ValidationError as err:
        if err.errors()[0]["type"] != "json_invalid":
            raise
    return model.model_validate(recipe_data(text))  # a row from before: the submitted YAML text


def load_recipe_json(text: str, source: str = "stored recipe") -> Recipe:
    """The stored recipe, validated; RecipeError naming `source` and the field when it no longer holds."""
    try:
        return _validate_stored(Recipe, text)
    except ValidationError as err:
        raise RecipeError(describe_validation_error(err, source)) from None
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None


class _StoredOutput(BaseModel):
    """A stored recipe's output block alone: valid even when the model and data files are gone."""

    model_config = ConfigDict(extra="ignore")
    output: OutputConfig = OutputConfig()


def stored_output_dir(text: str) -> Path | None:
    """output.dir of a stored recipe, without validating the rest again (None when it cannot be read)."""
    try:
        return _validate_stored(_StoredOutput, text).output.dir
    except (ValidationError, RecipeError):
        return None
