"""The resumable training state of a distillation: written atomically, checked against its recipe.

One file, `train_state.pt`, in the state folder: which stage it is in, the trainer's state
(trainable weights, optimizer, schedule, step), the data position, the random state, and the
history so far. A state written by a different recipe is refused, never silently resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from sea_convert.recipe_policy import OWNED_MARKER

STATE_FILE = "train_state.pt"


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
    folder that existed before gets no marker, and cleanup removes only the state file from it."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return
    (folder / OWNED_MARKER).write_text("this folder was created by sea-convert and is removed when its run is done\n")


def clear_state_dir(folder: Path) -> None:
    """After a successful publish: the whole folder if sea-convert made it, else only what it wrote there."""
    if (folder / OWNED_MARKER).is_file():
        shutil.rmtree(folder)
        return
    for name in (STATE_FILE, f".{STATE_FILE}.tmp"):
        (folder / name).unlink(missing_ok=True)


def save_state(folder: Path, state: dict) -> Path:
    """Write to a temporary file, then rename: a crash mid-write leaves the previous state intact."""
    make_state_dir(folder)
    path = folder / STATE_FILE
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(folder: Path, fingerprint: str) -> dict | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise ResumeError(
            f"{path} was written by a different recipe (model, sea, data or distill settings changed);"
            " delete the folder or set distill.resume: false to start over"
        )
    return state
