"""The checkpoints of every distillation (one process or N), with torch.distributed.checkpoint (DCP),
in a local folder or on S3 (fsspec). One process writes them without a process group.

Layout under the checkpoint URI:
    step-00000040/.metadata     written last by DCP's coordinator: a step folder without it is unfinished
    step-00000040/__0_0.distcp  the ranks' data
A checkpoint holds what decides the rest of the run: the trainable weights (the predictors; the
frozen teacher is not saved: it is reloaded from its source), the optimizer, the schedule and step,
the data position, the stage, each rank's random state, and the history so far. Resuming on the same
number of workers continues exactly where the run stopped.
"""

from __future__ import annotations

import io
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from sea_convert.train_state import ResumeError, rng_state, set_rng_state
from workers.train.parallel import rank_and_world

_STEP = re.compile(r"step-(\d{8})$")
# the frozen teacher is not part of the training state
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# loading: the frozen weights are missing on purpose; the trainable ones come from the same template
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@contextmanager
def _quiet_single_process():
    """DCP warns at every save and load without a process group; one process is a world of one on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _bytes(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _unbytes(buf: io.BytesIO):
    buf.seek(0)
    return torch.load(buf, weights_only=False)


class DistCheckpoints:
    def __init__(self, uri: str, storage_options: dict | None = None, keep: int = 2):
        self.uri, self.options, self.keep = uri.rstrip("/"), dict(storage_options or {}), keep
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.options)

    def _step_uri(self, step: int) -> str:
        return f"{self.uri}/step-{step:08d}"

    def complete_steps(self) -> list[int]:
        """Steps whose checkpoint is whole (its .metadata exists), oldest first."""
        self.fs.invalidate_cache()  # s3fs caches listings; other ranks and processes write here
        if not self.fs.exists(self.root):
            return []
        steps = []
        for path in self.fs.ls(self.root, detail=False):
            m = _STEP.search(path.rstrip("/"))
            if m and self.fs.exists(f"{path.rstrip('/')}/.metadata"):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, step: int, model, trainer, extra: dict) -> None:
        """Every rank calls this at the same step. `extra` (the same on every rank): data position,
        history, fingerprint..."""
        rank, _ = rank_and_world()
        if rank == 0 and self.fs.exists(f"{self.root}/step-{step:08d}"):
            # left by an earlier attempt: its old .metadata must not vouch for data half rewritten
            self.fs.rm(f"{self.root}/step-{step:08d}", recursive=True)
        if dist.is_initialized():
            dist.barrier()
        model_sd, optim_sd = get_state_dict(model, trainer.optimizer, options=_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd,
                 "extra": _bytes({**extra, "scheduler": trainer.scheduler.state_dict(), "step": trainer.step_count,
                                  "total_steps": trainer.total_steps}),
                 f"rng_rank{rank}": _bytes(rng_state())}
        with _quiet_single_process():
            dcp.save(state, storage_writer=FsspecWriter(self._step_uri(step), **self.options))
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            for old in self.complete_steps()[:-self.keep]:
                self.fs.rm(f"{self.root}/step-{old:08d}", recursive=True)

    def extra(self, step: int, fingerprint: str) -> dict:
        """Only `extra` (what to build before loading the rest: e.g. which stage's trainer); a checkpoint
        written by a different recipe is refused."""
        state = {"extra": io.BytesIO()}
        with _quiet_single_process():
            dcp.load(state, storage_reader=FsspecReader(self._step_uri(step), **self.options))
        return self._checked(step, _unbytes(state["extra"]), fingerprint)

    def _checked(self, step: int, extra: dict, fingerprint: str) -> dict:
        if extra.get("fingerprint") != fingerprint:
            raise ResumeError(f"{self._step_uri(step)} was written by a different recipe; delete {self.uri}"
                              " or set distill.resume: false to start over")
        return extra

    def load(self, step: int, model, trainer, fingerprint: str) -> dict:
        """Restore the trainer (weights, optimizer, schedule, step) and this rank's random state;
        returns `extra`. A checkpoint written by a different recipe is refused."""
        rank, _ = rank_and_world()
        model_sd, optim_sd = get_state_dict(model, trainer.optimizer, options=_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd, "extra": io.BytesIO(), f"rng_rank{rank}": io.BytesIO()}
        with _quiet_single_process():
            dcp.load(state, storage_reader=FsspecReader(self._step_uri(step), **self.options))
        extra = self._checked(step, _unbytes(state["extra"]), fingerprint)
        set_state_dict(model, trainer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_LOAD_OPTIONS)
        trainer.scheduler.load_state_dict(extra.pop("scheduler"))
        trainer.step_count = extra.pop("step")
        trainer.total_steps = extra.pop("total_steps")
        set_rng_state(_unbytes(state[f"rng_rank{rank}"]))
        return extra

    def clear(self) -> None:
        """Remove this run's step folders, and the folder itself only when nothing else is left in it: a
        checkpoint URI may name a folder that held other files before (they are never deleted)."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return
        for entry in self.fs.ls(self.root, detail=False):
            if _STEP.search(entry.rstrip("/")):
                self.fs.rm(entry, recursive=True)
        self.fs.invalidate_cache()
        try:
            if not self.fs.ls(self.root, detail=False):
                self.fs.rmdir(self.root)
        except (FileNotFoundError, OSError):
            pass  # object stores have no empty folders to remove


def checkpoints_for(recipe, state_dir: Path) -> DistCheckpoints:
    """Where a run's checkpoints go, whatever its worker count: distill.parallel.checkpoint_uri, else
    the state folder's dcp/."""
    par = recipe.distill.parallel
    return DistCheckpoints(par.checkpoint_uri or str(Path(state_dir).resolve() / "dcp"), par.storage_options,
                           par.keep_checkpoints)
