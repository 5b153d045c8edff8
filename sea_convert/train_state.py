"""What identifies and restores a distillation's training state: the recipe fingerprint it must match
(a state written by a different recipe is refused, never silently resumed), the random state, and the
state folder sea-convert may remove. The checkpoints themselves are written by workers.train.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from sea_convert.recipe_policy import OWNED_MARKER


class ResumeError(ValueError):
    pass


def recipe_fingerprint(recipe) -> str:
    """What decides the training trajectory: model, SEA settings, data and distillation settings."""
    fields = recipe.model_dump(mode="json", by_alias=True, include={"model", "sea", "data", "distill"})
    fields["distill"].pop("resume", None)
    fields["distill"].pop("checkpoint_every", None)  # saving more or less often does not change the run
    fields["distill"].pop("state_dir", None)
    parallel = fields["distill"].get("parallel", {})
    for where_or_how in ("launcher", "meta_init", "checkpoint_uri", "storage_options", "keep_checkpoints",
                         "max_failures", "cpus_per_worker", "shard_teacher"):
        parallel.pop(where_or_how, None)  # workers and param_dtype do change the trajectory
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_state_dir(folder: Path) -> None:
    """Create the state folder with a marker that says sea-convert made it, so cleanup may remove it; a
    folder that existed before gets no marker, and cleanup removes only the checkpoints from it."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return
    (folder / OWNED_MARKER).write_text("this folder was created by sea-convert and is removed when its run is done\n")


def clear_state_dir(folder: Path) -> None:
    """After a successful publish (its checkpoints already removed): the whole folder if sea-convert made
    it; a folder that existed before keeps what else it holds."""
    if (folder / OWNED_MARKER).is_file():
        shutil.rmtree(folder)
