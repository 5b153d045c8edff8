"""How long the rest of a conversion will take, from what the run has measured so far.

A local run is: load -> teacher evaluation (dense) -> stage A (-> stage B) -> validation (the same
evaluation with SEA attention, after reloading the trained model) -> publish. Each estimate uses
only measured times:
- the teacher evaluation's own duration, and one held-out window timed in both attention modes
  (the probe): validation ~= teacher evaluation x (SEA window / dense window);
- each stage's seconds per step, from its first steps (stage B, before it has run, is assumed to
  cost stage A's step scaled by its tokens per step, twice over: its student runs SEA attention with
  gradients through the model);
- the model's load time, for writing the checkpoint and reloading it before validation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sea_convert.data import Splits, eval_windows
from sea_convert.evaluate import mode_perplexity
from sea_convert.recipe import Recipe

STAGE_B_COST = 2.0  # the assumption above, until stage B's own steps are timed


def fmt_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


@dataclass
class RunEstimate:
    steps: dict[str, int]  # stage -> optimizer steps ("a", and "b" when the recipe has it)
    tokens_per_step: dict[str, int]
    started: float = field(default_factory=time.monotonic)
    load_s: float | None = None
    teacher_eval_s: float | None = None
    sea_over_dense: float | None = None
    step_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> RunEstimate:
        d, seq = recipe.distill, recipe.data.seq_len
        stages = {"a": d.stage_a, **({"b": d.stage_b} if d.stage_b is not None else {})}
        return cls({s: c.steps for s, c in stages.items()}, {s: c.batch_size * seq for s, c in stages.items()})

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _step_seconds(self, stage: str) -> float | None:
        if stage in self.step_s:
            return self.step_s[stage]
        a = self.step_s.get("a")
        if stage == "b" and a is not None:
            return a * STAGE_B_COST * self.tokens_per_step["b"] / self.tokens_per_step["a"]
        return None

    def remaining(self, stage: str, step: int = 0) -> float | None:
        """Seconds left in the run from `step` steps into `stage` ("a", "b") or after "distill";
        None while a needed time is not measured yet."""
        left = 0.0
        order = list(self.steps)
        todo = order[order.index(stage):] if stage in order else []
        for s in todo:
            per_step = self._step_seconds(s)
            if per_step is None:
                return None
            left += per_step * (self.steps[s] - (step if s == stage else 0))
        after = self.after_distill()
        return None if after is None else left + after

    def after_distill(self) -> float | None:
        """Seconds of validation and publishing (None until the teacher evaluation and probe ran)."""
        if None in (self.teacher_eval_s, self.sea_over_dense, self.load_s):
            return None
        return self.teacher_eval_s * self.sea_over_dense + self.load_s

    def line(self, stage: str, step: int = 0) -> str:
        left = self.remaining(stage, step)
        tail = "" if left is None else f", about {fmt_duration(left)} left"
        return f"run: {fmt_duration(self.elapsed())} so far{tail}"


def time_modes(model, recipe: Recipe, splits: Splits) -> float:
    """SEA over dense seconds on one held-out window (the probe of the module docstring)."""
    p = recipe.validate_.perplexity
    window = eval_windows(splits.held_out, p.ctx, 1)
    seconds = {}
    for mode in ("dense", "sea"):
        t0 = time.perf_counter()
        mode_perplexity(model, window, mode)
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        seconds[mode] = time.perf_counter() - t0
    return seconds["sea"] / max(seconds["dense"], 1e-9)
