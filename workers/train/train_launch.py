"""Starting the parallel stage A: N copies of workers.train.train_worker under Ray Train or torchrun.

Both restart a lost worker group (Ray Train's FailureConfig; torchrun's --max-restarts), and the
restarted workers resume from the newest whole distributed checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sea_convert.recipe import Recipe
from sea_convert.recipe_json import recipe_json
from workers.train.dist_checkpoint import checkpoints_for
from workers.train.train_worker import RESULT_FILE, WorkerConfig, train_worker

Log = Callable[[str], None]


class TrainingFailed(RuntimeError):
    pass


def worker_config(recipe: Recipe, out_dir: Path, state_dir: Path, **extra) -> dict:
    return WorkerConfig(recipe=recipe_json(recipe), out_dir=str(Path(out_dir).resolve()),
                        checkpoint_uri=checkpoints_for(recipe, state_dir).uri,
                        storage_options=recipe.distill.parallel.storage_options, **extra).model_dump()


def uses_gpu(recipe: Recipe) -> bool:
    return recipe.distill.device == "cuda" or (recipe.distill.device == "auto" and recipe.resources.gpus > 0)


def _ray_entry(config: dict) -> None:
    """What each Ray Train worker runs: the plain body, reporting every step to Ray."""
    import ray.train

    train_worker(config, report=lambda metrics: ray.train.report({k: v for k, v in metrics.items()
                                                                  if isinstance(v, int | float)}))


def launch_ray(recipe: Recipe, config: dict, run_dir: Path, log: Log = print) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    par, gpu = recipe.distill.parallel, uses_gpu(recipe)
    per_worker = {"CPU": par.cpus_per_worker, **({"GPU": 1} if gpu else {}), **recipe.resources.custom}
    trainer = TorchTrainer(
        _ray_entry,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=par.workers, use_gpu=gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=f"sea-distill-{recipe.name}", storage_path=str(Path(run_dir).resolve()),
                             failure_config=FailureConfig(max_failures=par.max_failures)),
    )
    log(f"stage A on {par.workers} Ray Train workers ({'GPU' if gpu else 'CPU'}, up to {par.max_failures} restarts)")
    result = trainer.fit()
    if result.error is not None:
        raise TrainingFailed(f"Ray Train run failed: {result.error}")
    return read_result(Path(config["out_dir"]))


def launch_torchrun(recipe: Recipe, config: dict, run_dir: Path, log: Log = print) -> dict:
    par = recipe.distill.parallel
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "worker_config.json"
    config_file.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={par.workers}",
           f"--max-restarts={par.max_failures}", "-m", "workers.train.train_worker", str(config_file)]
    log(f"stage A on {par.workers} torchrun workers (up to {par.max_failures} restarts)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise TrainingFailed(f"torchrun exited with an error (see the workers' output above); config {config_file}")
    return read_result(Path(config["out_dir"]))


def read_result(out_dir: Path) -> dict:
    path = out_dir / RESULT_FILE
    if not path.is_file():
        raise TrainingFailed(f"the workers finished without writing {path}")
    return json.loads(path.read_text())


def launch_training(recipe: Recipe, out_dir: Path, state_dir: Path, run_dir: Path, log: Log = print, **extra) -> dict:
    config = worker_config(recipe, out_dir, state_dir, **extra)
    launch = launch_ray if recipe.distill.parallel.launcher == "ray" else launch_torchrun
    return launch(recipe, config, run_dir, log)
