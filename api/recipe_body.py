"""A recipe in a request body (YAML or JSON): parsed and validated once, or a 4xx naming the problem."""

from __future__ import annotations

from fastapi import HTTPException, Request, status

from api.settings import Settings
from sea_convert.recipe import MalformedRecipe, Recipe, RecipeError, parse_recipe, recipe_data
from sea_convert.recipe_json import recipe_json


# The recipe is read from the raw body (YAML or JSON), so the route declares it for the OpenAPI document
RECIPE_BODY = {"requestBody": {"required": True, "description": "a recipe (see recipes/*.yaml)", "content": {
    "application/yaml": {"schema": {"type": "string"}},
    "application/json": {"schema": {"type": "object", "additionalProperties": True}},
}}}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read as it streams in and cut at `limit` (a chunked upload never sits whole in memory)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"recipe body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"recipe body over {limit} bytes")
    return bytes(body)


async def read_recipe(request: Request, settings: Settings) -> tuple[Recipe, str]:
    """The recipe, checked against the service's policy (paths, endpoints, hub names, maxima), and the
    text to store: the validated recipe as JSON, its paths resolved, so the job runs what was checked."""
    body = await read_body(request, settings.max_body_bytes)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "recipe body is not UTF-8 text") from None
    if not text.strip():
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "empty body: send the recipe as YAML or JSON")
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    try:
        data = recipe_data(text, as_json=kind == "application/json")
    except MalformedRecipe as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    except RecursionError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "recipe body nests too deeply") from None
    try:
        recipe = parse_recipe(data, base_dir=None, source="request body", policy=settings.recipe_policy())
    except RecipeError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from None
    return recipe, recipe_json(recipe)
