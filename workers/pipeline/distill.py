"""The distill stage in this process: the one training loop (workers.train.loop) as a world of one,
its checkpoints (DCP) in the run's state folder, `<state>/dcp/`, or at distill.parallel.checkpoint_uri.
A plain function (Ray-free)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sea_convert.data import Splits
from sea_convert.recipe import Recipe
from sea_convert.train_state import ResumeError, clear_state_dir
from workers.train.dist_checkpoint import checkpoints_for
from workers.train.loop import DistillResult, train_stages

# The one-file training state of sea-convert before every run checkpointed with DCP. Not read: resuming
# from it would keep a second format alive for runs cut short before an upgrade; the error names it.
LEGACY_STATE_FILE = "train_state.pt"


def distill_stage(
    recipe: Recipe,
    model,
    splits: Splits,
    on_step: Callable[[str, object], None] | None = None,
    progress: bool = False,
    state_dir: Path | None = None,
    on_trainer: Callable[[str, object], None] | None = None,
    only: tuple[str, ...] | None = None,
) -> DistillResult:
    """Train every configured stage. `state_dir` (None: no saving) holds the resumable state.
    `on_step(stage, metrics)` after every step; `on_trainer(stage, trainer)` sees each trainer before
    its first step (e.g. to fit a time budget). `only` runs a subset, e.g. ("b",) on a model whose
    predictors stage A already trained."""
    device = next(model.parameters()).device
    checkpoints = None
    if state_dir is not None:
        legacy = Path(state_dir) / LEGACY_STATE_FILE
        if recipe.distill.resume and legacy.is_file():
            raise ResumeError(f"{legacy} is a training state of an older sea-convert, which this version cannot"
                              " resume (it checkpoints with torch.distributed.checkpoint now): delete the file to"
                              " start over, or set distill.resume: false")
        checkpoints = checkpoints_for(recipe, state_dir)
    probe = splits.held_out[: recipe.data.seq_len].unsqueeze(0).to(device)
    hook = None if on_step is None else lambda stage, m, entry: on_step(stage, m)
    return train_stages(recipe, model, splits.train, probe, device, checkpoints, only=only, on_step=hook,
                        on_trainer=on_trainer, progress=progress)


def clear_state(recipe: Recipe, state_dir: Path | None) -> None:
    """After a successful publish the training state has served its purpose: the run's checkpoints
    (wherever they are), then the state folder if sea-convert made it (one that existed before keeps
    everything else it holds)."""
    if state_dir is None:
        return
    checkpoints_for(recipe, state_dir).clear()
    (Path(state_dir) / LEGACY_STATE_FILE).unlink(missing_ok=True)  # sea-convert's own, from before
    if Path(state_dir).is_dir():
        clear_state_dir(Path(state_dir))
