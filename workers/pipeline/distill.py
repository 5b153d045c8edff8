"""The distill stage: stage A, then the optional stage B, resumable. A plain function (Ray-free).

With `distill.checkpoint_every`, the training state is saved every N steps and at the end of
each stage; a run started again with the same recipe continues from it and ends exactly where
an uninterrupted run ends (same weights, same data order, same random state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from sea_convert.progress import progress_bar

from sea_convert.data import Splits, TrainBatches
from sea_convert.distill import StageATrainer
from sea_convert.finetune import StageBTrainer
from sea_convert.recipe import Recipe
from workers.train.dist_checkpoint import DistCheckpoints
from sea_convert.train_state import clear_state_dir, load_state, recipe_fingerprint, rng_state, save_state, set_rng_state

STAGES = ("a", "b")


@dataclass
class DistillResult:
    steps: int
    seconds: float  # training time over all runs of this conversion (a resumed run adds to it)
    tokens: int
    history: list[dict] = field(default_factory=list)  # one entry per step, with its "stage"
    held_out: dict = field(default_factory=dict)  # losses on a held-out window: "a_before", "a_after", "b_before", ...
    seconds_by_stage: dict = field(default_factory=dict)
    resumed_from: dict | None = None  # {"stage", "step"} when this run continued a saved state

    def summary(self) -> dict:
        out = {"steps": self.steps, "seconds": round(self.seconds, 1), "tokens": self.tokens,
               "seconds_by_stage": {k: round(v, 1) for k, v in self.seconds_by_stage.items()},
               "held_out": self.held_out, "resumed_from": self.resumed_from}
        for stage in STAGES:
            hist = [h for h in self.history if h["stage"] == stage]
            if hist:
                tail = hist[-max(1, len(hist) // 10):]
                out[f"stage_{stage}"] = {"steps": len(hist), "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"],
                                         "loss_last10pct_mean": sum(h["loss"] for h in tail) / len(tail)}
        a = out.get("stage_a")  # kept flat for the model card and older readers
        if a:
            out["train_loss_first"], out["train_loss_last"] = a["loss_first"], a["loss_last"]
            out["train_loss_last10pct_mean"] = a["loss_last10pct_mean"]
        return out


def _make_trainer(stage: str, recipe: Recipe, model):
    if stage == "a":
        return StageATrainer(model, recipe.sea, recipe.distill.stage_a)
    return StageBTrainer(model, recipe.sea, recipe.distill.stage_b)


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
    `on_trainer(stage, trainer)` sees each trainer before its first step (e.g. to fit a time budget).
    `only` runs a subset, e.g. ("b",) on a model whose predictors stage A already trained."""
    dcfg = recipe.distill
    device = next(model.parameters()).device
    fingerprint = recipe_fingerprint(recipe)
    saved = load_state(state_dir, fingerprint) if state_dir is not None and dcfg.resume else None
    torch.manual_seed(dcfg.seed)
    probe = splits.held_out[: recipe.data.seq_len].unsqueeze(0).to(device)
    stages = [s for s in STAGES if (s == "a" or dcfg.stage_b is not None) and (only is None or s in only)]
    history: list[dict] = saved["history"] if saved else []
    held_out: dict = saved["held_out"] if saved else {}
    seconds_by_stage: dict = saved["seconds_by_stage"] if saved else {}
    resumed_from = {"stage": saved["stage"], "step": saved["trainer"]["step"]} if saved else None

    for stage in stages:
        if saved and STAGES.index(stage) < STAGES.index(saved["stage"]):
            continue  # finished before the interruption; its weights are in the later stage's state
        cfg = dcfg.stage_a if stage == "a" else dcfg.stage_b
        trainer = _make_trainer(stage, recipe, model)
        batches = TrainBatches(splits.train, cfg.batch_size, dcfg.seed + STAGES.index(stage))
        if saved and saved["stage"] == stage:
            trainer.load_state_dict(saved["trainer"])
            batches.load_state_dict(saved["batches"])
            set_rng_state(saved["rng"])
        else:
            held_out[f"{stage}_before"] = asdict(trainer.evaluate(probe))
        if on_trainer is not None:
            on_trainer(stage, trainer)

        def checkpoint() -> None:
            if state_dir is not None and dcfg.checkpoint_every is not None:
                save_state(state_dir, {"fingerprint": fingerprint, "stage": stage, "trainer": trainer.state_dict(),
                                       "batches": batches.state_dict(), "rng": rng_state(), "history": history,
                                       "held_out": held_out, "seconds_by_stage": seconds_by_stage})

        bar = progress_bar(total=trainer.total_steps, initial=trainer.step_count, desc=f"distill (stage {stage.upper()})",
                   disable=not progress)
        while trainer.step_count < trainer.total_steps:
            m = trainer.step(batches.next().to(device))
            seconds_by_stage[stage] = seconds_by_stage.get(stage, 0.0) + m.seconds
            history.append({"stage": stage, **asdict(m)})
            bar.update(1)
            bar.set_postfix(loss=f"{m.loss:.4f}", refresh=False)  # a line in a log only every SEA_CONVERT_PROGRESS_EVERY_S
            if dcfg.checkpoint_every is not None and trainer.step_count % dcfg.checkpoint_every == 0:
                checkpoint()
            if on_step is not None:
                on_step(stage, m)
        bar.close()
        held_out[f"{stage}_after"] = asdict(trainer.evaluate(probe))
        checkpoint()

    tokens = sum(h["tokens"] for h in history)
    return DistillResult(len(history), sum(seconds_by_stage.values()), tokens, history, held_out,
                         seconds_by_stage, resumed_from)


def clear_state(state_dir: Path | None) -> None:
    """After a successful publish the training state has served its purpose (a folder that existed before
    the run keeps everything but the state file)."""
    if state_dir is not None and state_dir.is_dir():
        if (state_dir / "dcp").is_dir():  # a parallel run's distributed checkpoints (workers.train.train_launch)
            DistCheckpoints(str(state_dir / "dcp")).clear()
        clear_state_dir(state_dir)
