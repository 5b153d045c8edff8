"""The one training loop of a distillation: stage A, then the optional stage B, on one process or N.

One process is a world of one: the same code with no process group (`rank_and_world()` says rank 0
of 1, DCP writes without one). A gloo group of one starts in ~5 ms (measured), so cost is not the
reason: a group is process-wide state, and the pipeline trains inside the CLI's process, a Ray task
or a test process, which would each have to make and tear one down. With N ranks
(workers.train.train_worker) every rank runs this loop on its rows of each global batch; the
predictors' gradients are averaged and each step's numbers combined over the ranks.

With `distill.checkpoint_every` and a `DistCheckpoints`, the state is saved every N steps of a stage
and at its end; a run started again with the same recipe resumes from the newest whole checkpoint
and ends exactly where an uninterrupted run ends (same weights, data order and random state).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist

from sea_convert.data import TrainBatches
from sea_convert.distill import StageATrainer
from sea_convert.finetune import StageBTrainer
from sea_convert.progress import progress_bar
from sea_convert.recipe import Recipe
from sea_convert.train_state import recipe_fingerprint
from workers.train.dist_checkpoint import DistCheckpoints
from workers.train.parallel import gradient_averager, rank_and_world, rank_rows

STAGES = ("a", "b")
StepHook = Callable[[str, object, dict], None]  # (stage, the step's metrics over all ranks, its history entry)


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

    @classmethod
    def from_history(cls, history: list[dict], held_out: dict, resumed_from: dict | None) -> "DistillResult":
        by_stage: dict[str, float] = {}
        for h in history:  # summed in step order, as a running total would be
            by_stage[h["stage"]] = by_stage.get(h["stage"], 0.0) + h["seconds"]
        return cls(len(history), sum(by_stage.values()), sum(h["tokens"] for h in history), history, held_out,
                   by_stage, resumed_from)


def make_trainer(stage: str, recipe: Recipe, model):
    if stage == "a":
        return StageATrainer(model, recipe.sea, recipe.distill.stage_a)
    return StageBTrainer(model, recipe.sea, recipe.distill.stage_b)


def _per_rank(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's `values` (one all-gather per step; NCCL gathers GPU tensors, gloo CPU ones)."""
    if not dist.is_initialized():
        return [values]
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.float64, device=where)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [t.tolist() for t in gathered]


def _over_ranks(m, peak_gib: float, device: torch.device):
    """(the step's metrics over all ranks, each rank's peak GiB): means of the losses, the slowest
    rank's seconds (the step ends when it does), every rank's tokens. One rank: `m` itself."""
    names = [f.name for f in fields(m) if f.name not in ("step", "lr", "tokens")]
    ranks = _per_rank([float(getattr(m, n)) for n in names] + [peak_gib], device)
    world = len(ranks)
    if world == 1:
        return m, [peak_gib]
    values = {n: sum(r[i] for r in ranks) / world for i, n in enumerate(names)}
    values["seconds"] = max(r[names.index("seconds")] for r in ranks)
    return replace(m, tokens=m.tokens * world, **values), [r[-1] for r in ranks]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class _Run:
    """One call of train_stages: what its stages share (history, held-out losses, checkpoints)."""

    def __init__(self, recipe: Recipe, model, windows: torch.Tensor, probe: torch.Tensor, device: torch.device,
                 checkpoints: DistCheckpoints | None, log: Callable[[str], None]):
        self.recipe, self.model, self.windows, self.probe, self.device = recipe, model, windows, probe, device
        self.checkpoints, self.log = checkpoints, log
        self.rank, self.world = rank_and_world()
        self.fingerprint = recipe_fingerprint(recipe)
        self.history: list[dict] = []
        self.held_out: dict = {}
        self.resumed_from: dict | None = None

    def saved(self) -> tuple[int, dict] | None:
        """(step, extra) of the newest whole checkpoint to resume from. Starting over (distill.resume
        false) removes the old ones first: their step folders would pass for this run's newest."""
        latest = self.checkpoints.latest() if self.checkpoints is not None else None
        if latest is None:
            return None
        if self.recipe.distill.resume:
            extra = self.checkpoints.extra(latest, self.fingerprint)
            extra.setdefault("stage", "a")  # written by the parallel stage A before the loop was one
            return latest, extra
        _barrier()  # every rank has looked before rank 0 clears
        if self.rank == 0:
            self.checkpoints.clear()
        _barrier()
        return None

    def save(self, stage: str, trainer, batches: TrainBatches) -> float:
        t0 = time.perf_counter()
        # named by the steps of all stages so far: one folder per save, newest = largest
        self.checkpoints.save(len(self.history), self.model, trainer,
                              {"fingerprint": self.fingerprint, "stage": stage, "batches": batches.state_dict(),
                               "history": self.history, "held_out": self.held_out})
        seconds = round(time.perf_counter() - t0, 3)
        self.log(f"checkpoint of stage {stage.upper()} step {trainer.step_count} saved to {self.checkpoints.uri}"
                 f" in {seconds:.2f} s")
        return seconds

    def step(self, stage: str, trainer, batches: TrainBatches):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        m = trainer.step(rank_rows(batches.next(), self.rank, self.world).to(self.device))
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else 0.0
        m, peaks = _over_ranks(m, peak, self.device)
        entry = {"stage": stage, **asdict(m), "tokens_per_s": m.tokens / m.seconds, "workers": self.world,
                 "memory_gib_per_rank": [round(p, 2) for p in peaks] if cuda else []}
        self.history.append(entry)
        return m, entry

    def stage(self, stage: str, resume: int | None, on_step: StepHook | None, on_trainer, progress: bool,
              max_steps: int | None) -> None:
        dcfg = self.recipe.distill
        cfg = dcfg.stage_a if stage == "a" else dcfg.stage_b
        trainer = make_trainer(stage, self.recipe, self.model)
        if self.world > 1:
            trainer.grad_sync = gradient_averager(trainer.params)
        batches = TrainBatches(self.windows, cfg.batch_size, dcfg.seed + STAGES.index(stage))
        if resume is not None:
            extra = self.checkpoints.load(resume, self.model, trainer, self.fingerprint)
            batches.load_state_dict(extra["batches"])
            self.history, self.held_out = extra["history"], extra["held_out"]
            self.resumed_from = {"stage": stage, "step": trainer.step_count}
            self.log(f"resumed from {self.checkpoints.uri} at stage {stage.upper()} step {trainer.step_count}")
        else:
            self.held_out[f"{stage}_before"] = asdict(trainer.evaluate(self.probe))
        if on_trainer is not None:
            on_trainer(stage, trainer)
        if f"{stage}_after" in self.held_out:
            return  # resumed from this stage's last checkpoint: it is done
        every = dcfg.checkpoint_every if self.checkpoints is not None else None
        bar = progress_bar(total=trainer.total_steps, initial=trainer.step_count, desc=f"distill (stage {stage.upper()})",
                           disable=not progress or self.rank != 0)
        while trainer.step_count < min(trainer.total_steps, max_steps or trainer.total_steps):  # a hook may re-plan
            m, entry = self.step(stage, trainer, batches)
            bar.update(1)
            bar.set_postfix(loss=f"{m.loss:.4f}", refresh=False)  # a line in a log only every SEA_CONVERT_PROGRESS_EVERY_S
            if every and trainer.step_count % every == 0 and trainer.step_count < trainer.total_steps:
                entry["checkpoint_s"] = self.save(stage, trainer, batches)  # the last step's save comes below
            if on_step is not None:
                on_step(stage, m, entry)
        bar.close()
        if trainer.step_count < trainer.total_steps:
            return  # stopped at max_steps: not the stage's end
        self.held_out[f"{stage}_after"] = asdict(trainer.evaluate(self.probe))
        if every:
            self.history[-1]["checkpoint_s"] = self.save(stage, trainer, batches)


def seed_and_pin_kernels(seed: int) -> None:
    """The run's seed, and cuDNN's deterministic algorithms (the predictor's convolutions; its heuristics may pick
    backward kernels that add atomically): with the atomics-free teacher targets, a run on one GPU repeats itself,
    so a resumed run can be held to an uninterrupted one (issue 24). cuBLAS is deterministic on one stream."""
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def train_stages(recipe: Recipe, model, windows: torch.Tensor, probe: torch.Tensor, device: torch.device,
                 checkpoints: DistCheckpoints | None = None, *, only: tuple[str, ...] | None = None,
                 on_step: StepHook | None = None, on_trainer: Callable[[str, object], None] | None = None,
                 progress: bool = False, max_steps: int | None = None,
                 log: Callable[[str], None] = lambda msg: None) -> DistillResult:
    """Train every configured stage of `recipe` on `model` (predictors attached; sharded or not) from
    `windows` (the global batches; this rank takes its rows), resuming from `checkpoints` (None: no
    saving). `probe` (on `device`) gives the held-out losses before and after each stage.
    `on_trainer(stage, trainer)` sees each trainer before its first step (e.g. to fit a time budget);
    `only` runs a subset, e.g. ("b",) on a model whose predictors stage A already trained;
    `max_steps` stops a stage early (benchmarks time a few steps of a long schedule)."""
    dcfg = recipe.distill
    run = _Run(recipe, model, windows, probe, device, checkpoints, log)
    saved = run.saved()
    seed_and_pin_kernels(dcfg.seed)
    stages = [s for s in STAGES if (s == "a" or dcfg.stage_b is not None) and (only is None or s in only)]
    for stage in stages:
        if saved and STAGES.index(stage) < STAGES.index(saved[1]["stage"]):
            continue  # finished before the interruption; its weights are in the later stage's checkpoint
        resume = saved[0] if saved and saved[1]["stage"] == stage else None
        run.stage(stage, resume, on_step, on_trainer, progress, max_steps)
    return DistillResult.from_history(run.history, run.held_out, run.resumed_from)
