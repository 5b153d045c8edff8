"""Print the recipe reference (every field, type, default, meaning) as Markdown, from the pydantic models."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from sea_convert.recipe import Recipe
from sea_convert.recipe_paths import without_marks


def _type_name(ann) -> str:
    s = str(without_marks(ann)).replace("typing.", "").replace("pathlib.", "").replace("<class '", "").replace("'>", "")
    return s.replace("Literal", "one of ").replace("NoneType", "None")


def rows(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        key = f.alias or name
        path = f"{prefix}{key}"
        ann = f.annotation
        sub = next((a for a in typing.get_args(ann) or (ann,) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            yield from rows(sub, path + ".")
            continue
        default = "required" if f.is_required() else repr(f.default_factory() if f.default_factory else f.default)
        yield path, _type_name(ann), default, f.description or ""


if __name__ == "__main__":
    print("| field | type | default | meaning |")
    print("|---|---|---|---|")
    for r in rows(Recipe):
        cells = [f"`{r[0]}`", *(x.replace("|", "\\|") for x in r[1:])]
        print("| " + " | ".join(cells) + " |")
