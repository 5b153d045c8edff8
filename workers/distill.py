"""The distill stage: stage A over the recipe's training windows. A plain function (Ray-free)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from sea_convert.data import Splits, TrainBatches
from sea_convert.distill import StageATrainer, StepMetrics
from sea_convert.recipe import Recipe


@dataclass
class DistillResult:
    steps: int
    seconds: float
    tokens: int
    history: list[dict] = field(default_factory=list)
    held_out_before: dict | None = None  # distillation losses on a held-out window before training
    held_out_after: dict | None = None

    def summary(self) -> dict:
        first, last = self.history[0], self.history[-1]
        tail = self.history[-max(1, len(self.history) // 10):]
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "tokens": self.tokens,
            "train_loss_first": first["loss"],
            "train_loss_last": last["loss"],
            "train_loss_last10pct_mean": sum(h["loss"] for h in tail) / len(tail),
            "held_out_before": self.held_out_before,
            "held_out_after": self.held_out_after,
        }


def _held_out_batch(splits: Splits, seq_len: int) -> torch.Tensor:
    return splits.held_out[:seq_len].unsqueeze(0)


def distill_stage(
    recipe: Recipe,
    model,
    splits: Splits,
    on_step: Callable[[StepMetrics], None] | None = None,
    progress: bool = False,
) -> DistillResult:
    cfg = recipe.distill.stage_a
    device = next(model.parameters()).device
    torch.manual_seed(recipe.distill.seed)
    trainer = StageATrainer(model, recipe.sea, cfg)
    batches = TrainBatches(splits.train, cfg.batch_size, recipe.distill.seed)
    probe = _held_out_batch(splits, recipe.data.seq_len).to(device)
    before = asdict(trainer.evaluate(probe))
    t0 = time.perf_counter()
    history = []
    bar = tqdm(range(cfg.steps), desc="distill (stage A)", disable=not progress)
    for _ in bar:
        m = trainer.step(batches.next().to(device))
        history.append(asdict(m))
        bar.set_postfix(loss=f"{m.loss:.4f}", kl=f"{m.kl:.3f}", mse=f"{m.mse:.3f}")
        if on_step is not None:
            on_step(m)
    seconds = time.perf_counter() - t0
    after = asdict(trainer.evaluate(probe))
    tokens = sum(h["tokens"] for h in history)
    return DistillResult(cfg.steps, seconds, tokens, history, before, after)
