"""A recipe in a request body (YAML or JSON): parsed and validated once, or a 4xx naming the problem."""

from __future__ import annotations

import json

import yaml
from fastapi import HTTPException, Request, status

from api.settings import Settings
from sea_convert.recipe import Recipe, RecipeError, parse_recipe


# The recipe is read from the raw body (YAML or JSON), so the route declares it for the OpenAPI document
RECIPE_BODY = {"requestBody": {"required": True, "description": "a recipe (see recipes/*.yaml)", "content": {
    "application/yaml": {"schema": {"type": "string"}},
    "application/json": {"schema": {"type": "object", "additionalProperties": True}},
}}}


async def read_recipe(request: Request, settings: Settings) -> tuple[Recipe, str]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"recipe body over {settings.max_body_bytes} bytes")
    body = await request.body()
    if len(body) > settings.max_body_bytes:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"recipe body over {settings.max_body_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "recipe body is not UTF-8 text") from None
    if not text.strip():
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "empty body: send the recipe as YAML or JSON")
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    try:
        data = json.loads(text) if kind == "application/json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed {'JSON' if kind == 'application/json' else 'YAML'}{where}: "
                            f"{getattr(err, 'problem', None) or err}") from None
    try:
        recipe = parse_recipe(data, base_dir=None, source="request body")
    except RecipeError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from None
    _inside_output_root(recipe, settings)
    return recipe, text


def _inside_output_root(recipe: Recipe, settings: Settings) -> None:
    """A submitted recipe writes only under the service's output root (no path traversal)."""
    root = settings.output_root.resolve()
    target = (root / recipe.output.dir).resolve() if not recipe.output.dir.is_absolute() else recipe.output.dir.resolve()
    if root != target and root not in target.parents:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"request body: invalid recipe\n  output.dir: {recipe.output.dir} is outside the service's output root")

