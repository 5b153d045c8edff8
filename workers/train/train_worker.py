"""The worker body of a parallel stage A: one process per GPU (or CPU rank with gloo).

A plain function of a JSON-able config, `WorkerConfig`, whose recipe is the validated recipe's JSON
(loaded with `load_recipe_json`, never parsed from YAML again). Ray Train's TorchTrainer calls it
(workers/train/train_launch.py), `python -m torch.distributed.run -m workers.train.train_worker CONFIG.json`
calls it, and so does a plain `python -m workers.train.train_worker CONFIG.json` (one process, no process group).

Per rank: the teacher (sharded with FSDP2 when there are several ranks), the predictors (whole,
data-parallel); then the one training loop (workers.train.loop), which takes this rank's rows of each
global batch, checkpoints every `distill.checkpoint_every` steps and resumes a restarted worker group
from the newest whole checkpoint. Rank 0 writes the trained predictors and the run's summary to
`out_dir`, each file atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from sea_convert.checkpoint import PREDICTORS_FILE, write_predictors
from sea_convert.data import build_splits
from sea_convert.integration import attach_sea, check_supported, compile_predictors, predictors
from sea_convert.models import DTYPES, load_teacher, source_location
from sea_convert.recipe import Recipe
from sea_convert.recipe_json import load_recipe_json
from sea_convert.train_state import recipe_fingerprint
from workers.train.dist_checkpoint import DistCheckpoints
from workers.train.loop import train_stages
from workers.train.parallel import rank_and_world, shard_teacher
from workers.train.sharded_load import build_skeleton, init_random_weights, load_sharded_weights, materialize

RESULT_FILE = "result.json"
Report = Callable[[dict], None]


class SyntheticTeacher(BaseModel):
    """Benchmarks of shapes no checkpoint exists for here: a config, random weights, random tokens."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]  # transformers config fields, with model_type
    windows: int = 64


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str  # the validated recipe as JSON (sea_convert.recipe_json: its paths absolute)
    out_dir: str
    checkpoint_uri: str | None = None
    storage_options: dict[str, Any] = {}
    synthetic: SyntheticTeacher | None = None
    max_steps: int | None = None  # stop early (benchmarks time a few steps of a long schedule)
    log_every: int = 10


def init_distributed(recipe: Recipe) -> tuple[int, int, torch.device]:
    """(rank, world, device). Ray Train has already made the process group; torchrun leaves it to us."""
    use_cuda = recipe.distill.device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        store, rank, world = next(dist.rendezvous("env://"))
        # torchrun restarts reuse the agent's store: without a per-attempt prefix a restarted rank can read
        # a dead peer's address from the attempt before (seen: gloo "connection refused" on every restart)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.PrefixStore(f"sea/attempt-{attempt}", store),
                                rank=rank, world_size=world)
    rank, world = rank_and_world()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _safetensors_folder(recipe: Recipe) -> Path | None:
    if recipe.model.gguf_file or (recipe.model.path is None and recipe.model.package is None):
        return None  # GGUF or hub id: no local safetensors to slice
    folder = Path(source_location(recipe.model)[0])
    return folder if any(folder.glob("*.safetensors")) else None


def build_teacher(cfg: WorkerConfig, recipe: Recipe, device: torch.device, world: int, log: Callable[[str], None]):
    """(model with predictors on `device`, sharded when world > 1; tokenizer or None for synthetic)."""
    par = recipe.distill.parallel
    dtype = DTYPES[recipe.model.dtype]
    param_dtype = DTYPES[par.param_dtype] if par.param_dtype else None
    folder = None if cfg.synthetic else _safetensors_folder(recipe)
    shard = world > 1 and par.shard_teacher
    if cfg.synthetic or (par.meta_init and folder is not None and shard):
        from transformers import AutoConfig, AutoTokenizer

        if cfg.synthetic:
            fields = dict(cfg.synthetic.config)
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        else:
            config = AutoConfig.from_pretrained(folder)
        check_supported(config)
        model = build_skeleton(config, dtype)
        attach_sea(model, recipe.sea, device="cpu")  # same seed on every rank: the same predictors
        if shard:
            shard_teacher(model, param_dtype=param_dtype)
        materialize(model, device)
        if cfg.synthetic:
            init_random_weights(model, recipe.distill.seed)
            log(f"built {config.num_hidden_layers} layers x {config.hidden_size} on the meta device, random weights")
            return model, None
        read = load_sharded_weights(model, folder)
        log(f"read this rank's shard of every weight from {folder}: {read / 2**30:.2f} GiB")
        return model, AutoTokenizer.from_pretrained(folder)
    model, tokenizer = load_teacher(recipe.model, "cpu")  # whole on every rank, then sharded
    attach_sea(model, recipe.sea)
    model.to(device)
    if shard:
        shard_teacher(model, param_dtype=param_dtype)
    elif param_dtype is not None:
        model.to(param_dtype)
        for pred in predictors(model):
            pred.float()  # the predictors train in fp32 whatever the teacher computes in
    return model, tokenizer


def _training_windows(cfg: WorkerConfig, recipe: Recipe, tokenizer):
    """(training windows, held-out probe window)."""
    seq = recipe.data.seq_len
    if cfg.synthetic:
        g = torch.Generator().manual_seed(recipe.distill.seed)
        vocab = cfg.synthetic.config["vocab_size"]
        windows = torch.randint(0, vocab, (cfg.synthetic.windows + 1, seq), generator=g)
        return windows[:-1], windows[-1:]
    splits = build_splits(recipe.data, tokenizer)
    return splits.train, splits.held_out[:seq].unsqueeze(0)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _rank0_log(msg: str) -> None:
    # straight to stdout, not print(): Ray Train patches a worker's print to log through its logger and also
    # echo it, so every printed line reached the job's log twice
    sys.stdout.write(f"[rank 0] {msg}\n")
    sys.stdout.flush()


def train_worker(config: dict | WorkerConfig, report: Report | None = None) -> dict:
    """Run (or resume) stage A on this rank; returns the run's summary (the same on every rank)."""
    cfg = WorkerConfig.model_validate(config)
    recipe = load_recipe_json(cfg.recipe, source="worker config recipe")
    stage_a, dcfg = recipe.distill.stage_a, recipe.distill
    rank, world, device = init_distributed(recipe)
    if device.type == "cpu" and world > 1:
        # as many threads as the cores the worker reserved, under either launcher (Ray sets OMP_NUM_THREADS
        # from the reservation, torchrun to 1): both then round alike, and a restarted group as the first
        torch.set_num_threads(max(1, int(dcfg.parallel.cpus_per_worker)))
    log = _rank0_log if rank == 0 else (lambda msg: None)
    torch.manual_seed(dcfg.seed)
    t_load = time.perf_counter()
    model, tokenizer = build_teacher(cfg, recipe, device, world, log)
    load_s = time.perf_counter() - t_load
    windows, probe = _training_windows(cfg, recipe, tokenizer)
    log(f"{world} worker(s) on {device.type}; teacher ready in {load_s:.1f} s;"
        f" {windows.shape[0]} training windows of {windows.shape[1]} tokens, global batch {stage_a.batch_size}")

    if recipe.sea.compile and device.type == "cuda":
        compile_predictors(model)  # fewer kernel launches per layer: matters once each GPU's share is small
    ckpts = DistCheckpoints(cfg.checkpoint_uri, cfg.storage_options, dcfg.parallel.keep_checkpoints) \
        if cfg.checkpoint_uri else None
    last = min(stage_a.steps, cfg.max_steps or stage_a.steps)

    def on_step(stage: str, m, entry: dict) -> None:
        if m.step % cfg.log_every == 0 or m.step == last:
            if report is not None:
                # Ray Train's report() is a barrier of all workers through an actor: ~1.7 s a call on a 2-core
                # host (measured), so once per log line, not per step (the history has every step)
                report(entry)
            log(f"step {m.step}: loss {m.loss:.4f}, {entry['tokens_per_s']:.0f} tokens/s, {m.seconds:.2f} s/step"
                + (f", peak GiB per rank {entry['memory_gib_per_rank']}" if entry["memory_gib_per_rank"] else ""))

    result = train_stages(recipe, model, windows, probe.to(device), device, ckpts, only=("a",), on_step=on_step,
                          max_steps=cfg.max_steps, log=log)
    summary = {**asdict(result), "workers": world, "fingerprint": recipe_fingerprint(recipe),
               "teacher_load_s": round(load_s, 1)}
    if rank == 0:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / PREDICTORS_FILE, lambda p: write_predictors(model, p))
        _write_atomic(out / RESULT_FILE, lambda p: p.write_text(json.dumps(summary, indent=1) + "\n"))
    if dist.is_initialized():
        dist.barrier()
    return summary


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m workers.train.train_worker CONFIG.json")
    config = WorkerConfig.model_validate_json(Path(argv[0]).read_text())
    try:
        train_worker(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
