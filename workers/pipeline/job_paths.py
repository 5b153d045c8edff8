"""Where one job's files live, and who may remove them: the checkpoint folder, the work folder of
stage hand-over files beside it (`<dir>.work`, its `owner.json` naming the run that made it) and the
training state (`<dir>.state`, or distill.state_dir). Light (no torch): the service's runner uses it
to clear a cancelled job's work folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from sea_convert.recipe import Recipe
from sea_convert.recipe_json import stored_output_dir


def default_state_dir(recipe: Recipe, output_dir: Path) -> Path:
    return recipe.distill.state_dir or output_dir.with_name(output_dir.name + ".state")


@dataclass(frozen=True)
class JobPaths:
    destination: Path  # the converted checkpoint folder
    work: Path  # stage hand-over files of one run
    state: Path  # resumable training state (distill)

    @classmethod
    def for_recipe(cls, recipe: Recipe, destination: Path | None = None) -> "JobPaths":
        dest = Path(destination) if destination is not None else recipe.output.dir
        return cls(dest, work_dir_for(dest), default_state_dir(recipe, dest))


def work_dir_for(destination: Path) -> Path:
    return destination.with_name(destination.name + ".work")


def work_owner(work: Path) -> str | None:
    """The run that made this work folder (its owner.json), None when sea-convert did not make it."""
    try:
        return json.loads((work / "owner.json").read_text())["owner"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_work(work: Path, owner: str) -> bool:
    """A run's hand-over files once it has ended, whatever the outcome (they can be gigabytes); only the
    folder that run made is removed."""
    if work_owner(work) != owner:
        return False
    shutil.rmtree(work, ignore_errors=True)
    return True


def stored_work_dir(recipe_text: str, output_root: Path) -> Path | None:
    """A stored job's work folder, from its recipe's output.dir alone (the model and data files may be gone by
    now): absolute as the service stored it, or relative to the output root."""
    dest = stored_output_dir(recipe_text)
    if dest is None:
        return None
    return work_dir_for(dest if dest.is_absolute() else Path(output_root) / dest)
