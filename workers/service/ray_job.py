"""One conversion as a Ray job: the entrypoint the orchestrator submits through JobSubmissionClient.

    python -m workers.service.ray_job --job-id ID --output-root DIR     (database URL: SEA_CONVERT_DATABASE_URL)
    python -m workers.service.ray_job --recipe FILE --output-root DIR   (one recipe, no service: a KubeRay RayJob)

`run_job` reads the job's recipe from the database and runs distill -> validate -> publish, each
through `execute(stage_function, args, options)`: in the Ray job that is a Ray task with the
recipe's resources (GPUs, CPUs, memory, custom), in tests a plain call. A stage that raises runs
again after backoff_s, 2 x backoff_s, ...; bad input and missed gates are not retried. Every
stage, the metrics and the artifact are recorded in the database as they happen. A job cancelled
while it runs (the service stops this Ray job) is never overwritten: a finished job never moves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sea_convert.checkpoint import CheckpointError
from sea_convert.recipe import Recipe, RecipeError, load_recipe
from sea_convert.recipe_json import load_recipe_json, recipe_json
from workers.service.jobstore import FINAL_STATES, STAGES, BadTransition, JobStore
from workers.service.job_progress import ProgressSink
from workers.pipeline.job_paths import JobPaths, remove_work
from workers.pipeline.stages import GateFailure, check_destination, claim_work_dir, stage_distill, stage_publish, stage_validate

NOT_RETRIED = (GateFailure, RecipeError, CheckpointError)
Execute = Callable[[Callable, tuple, dict], object]


def run_stage(stage: str, recipe: Recipe, paths: JobPaths, owner: str, on_progress: ProgressSink | None = None):
    """The body of one stage task (module level, so Ray can ship it to a worker)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # bars are noise in a followed log; the stages log steps instead

    def log(message: str) -> None:
        print(f"[{stage}] {message}", flush=True)

    if stage == "distill":
        return stage_distill(recipe, paths, log=log, log_every=max(1, recipe.distill.stage_a.steps // 20),
                             on_progress=on_progress)
    if stage == "validate":
        return stage_validate(recipe, paths, log=log)
    return stage_publish(recipe, paths, owner, log=log)


def stage_options(recipe: Recipe, stage: str) -> dict:
    """Ray task options: the recipe's resources for the heavy stages, one CPU to publish."""
    if stage == "publish":
        return {"num_cpus": 1, "max_retries": 0}
    r = recipe.resources
    if stage == "distill" and recipe.distill.parallel.launched:
        # the stage only drives Ray Train, whose workers ask for the GPUs (and custom resources) themselves;
        # holding them here would leave the workers waiting forever
        return {"num_cpus": 1, "max_retries": 0}
    opts: dict = {"num_cpus": r.cpus, "num_gpus": r.gpus, "max_retries": 0}  # retries are ours, with backoff
    if r.gpus > 0:
        opts["max_calls"] = 1  # a fresh worker per GPU stage: the next stage starts with the GPU memory free
    if r.memory_gb is not None:
        opts["memory"] = int(r.memory_gb * 2**30)
    if r.custom:
        opts["resources"] = dict(r.custom)
    return opts


def plain_execute(fn: Callable, args: tuple, options: dict):
    return fn(*args)


def ray_execute(fn: Callable, args: tuple, options: dict):
    import ray

    check_feasible(options, ray.nodes())
    try:
        # the decorator, not .options(): max_calls (a GPU stage's fresh worker) is refused by .options()
        return ray.get(ray.remote(**options)(fn).remote(*args))
    except ray.exceptions.RayTaskError as err:  # the stage raised: hand back its own exception
        cause = getattr(err, "cause", None)
        raise (cause if isinstance(cause, BaseException) else err) from None


# a stage task's option -> the node resource it needs, and the recipe field that asked for it
_RESOURCE_FIELDS = {"num_cpus": ("CPU", "resources.cpus"), "num_gpus": ("GPU", "resources.gpus"),
                    "memory": ("memory", "resources.memory_gb")}


def check_feasible(options: dict, nodes: list[dict]) -> None:
    """Fail at once, naming the field, when no node of the cluster could run the stage: Ray would keep
    the task pending forever. On a cluster that autoscales (SEA_CONVERT_AUTOSCALING=1, which the service
    sets from its ray_autoscales setting) the autoscaler judges what node types can be added."""
    if os.environ.get("SEA_CONVERT_AUTOSCALING") == "1":
        return
    totals = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    wanted = {_RESOURCE_FIELDS[k][0]: (v, _RESOURCE_FIELDS[k][1]) for k, v in options.items()
              if k in _RESOURCE_FIELDS and v}
    wanted.update({name: (amount, f"resources.custom.{name}") for name, amount in options.get("resources", {}).items()})
    if not totals or any(all(have.get(r, 0) >= amount for r, (amount, _) in wanted.items()) for have in totals):
        return
    problems = [f"{field} asks for {amount:g} {r}; the largest node has {max(h.get(r, 0) for h in totals):g}"
                for r, (amount, field) in wanted.items() if all(h.get(r, 0) < amount for h in totals)]
    raise RecipeError("no node of the cluster can run this stage: " + ("; ".join(problems) or
                      "no single node has all of " + ", ".join(f for _, f in wanted.values())))


def job_paths(recipe: Recipe, output_root: Path) -> JobPaths:
    """A submitted recipe's output.dir is inside the service's output root (the API checked it)."""
    dest = recipe.output.dir if recipe.output.dir.is_absolute() else Path(output_root) / recipe.output.dir
    return JobPaths.for_recipe(recipe, dest)


def _metrics(report: dict) -> dict:
    keep = ("perplexity", "mmlu", "gates_passed", "gate_failures", "provenance", "distill")
    return {k: report[k] for k in keep if k in report}


def _finish(store: JobStore, job_id: str, status: str, log, **fields) -> str:
    requeued = (store.get(job_id).metrics or {}).get("requeued")
    if requeued and "metrics" in fields:
        fields["metrics"] = {**fields["metrics"], "requeued": requeued}  # kept: how often Ray lost this job
    try:
        store.set_status(job_id, status, **fields)
    except BadTransition:  # cancelled (or otherwise finished) meanwhile: that word stands
        status = store.get(job_id).status
        log(f"job {job_id} is already {status}; its record is left as it is")
    return status


def run_job(store: JobStore, job_id: str, output_root: Path, execute: Execute = plain_execute,
            sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print) -> str:
    """Run one job to a final status (succeeded, gated, failed) and return it."""
    job = store.get(job_id)
    if job.status in FINAL_STATES:
        log(f"job {job_id} is {job.status} already: nothing to do")
        return job.status
    try:
        recipe = load_recipe_json(job.recipe, source=f"job {job_id} recipe")  # checked again: files may be gone
    except RecipeError as err:
        return _finish(store, job_id, "failed", log, error=str(err))
    if job.status == "queued":
        store.set_status(job_id, "running")
    paths = job_paths(recipe, output_root)
    try:
        check_destination(recipe, paths, owner=job_id)
        claim_work_dir(paths, owner=job_id)
    except CheckpointError as err:
        return _finish(store, job_id, "failed", log, error=str(err))

    sink = ProgressSink(store.engine.url.render_as_string(hide_password=False), job_id)
    try:
        return _run_stages(store, job_id, recipe, paths, execute, sleep, log, sink)
    finally:
        remove_work(paths.work, owner=job_id)  # whatever the ending: the hand-over files are this run's only


def _run_stages(store: JobStore, job_id: str, recipe: Recipe, paths: JobPaths, execute: Execute,
                sleep: Callable[[float], None], log: Callable[[str], None], sink: ProgressSink) -> str:
    results: dict = {}
    for i, stage in enumerate(STAGES):
        pause = recipe.retries.backoff_s
        for attempt in range(1, recipe.retries.attempts + 1):
            store.set_stage(job_id, stage, "running")
            log(f"stage {stage}: attempt {attempt} of {recipe.retries.attempts}")
            try:
                results[stage] = execute(run_stage, (stage, recipe, paths, job_id, sink), stage_options(recipe, stage))
                store.set_stage(job_id, stage, "succeeded")
                break
            except GateFailure as err:
                store.set_stage(job_id, stage, "skipped", error=str(err))
                log(f"{err}: nothing published")
                return _finish(store, job_id, "gated", log, error=str(err), metrics=_metrics(err.report))
            except Exception as err:  # noqa: BLE001  (any stage error is recorded, then retried or final)
                message = f"{type(err).__name__}: {err}"
                store.set_stage(job_id, stage, "failed", error=message)
                log(f"stage {stage} attempt {attempt} failed: {message}")
                if isinstance(err, NOT_RETRIED) or attempt == recipe.retries.attempts:
                    traceback.print_exc()
                    for later in STAGES[i + 1:]:
                        store.set_stage(job_id, later, "skipped")
                    return _finish(store, job_id, "failed", log, error=f"stage {stage}: {message}",
                                   metrics=_metrics(results.get("validate", {})))
                log(f"stage {stage}: retrying in {pause:g} s")
                sleep(pause)
                pause *= 2
    published = results["publish"]
    artifact = published["published"]["uri"] if published.get("published") else str(Path(published["checkpoint"]).resolve())
    metrics = {**_metrics(results["validate"]), "checkpoint": published["checkpoint"], "published": published.get("published"),
               "manifest": published.get("manifest")}
    log(f"job {job_id} succeeded: {artifact}")
    return _finish(store, job_id, "succeeded", log, metrics=metrics, artifact_uri=artifact)


EXIT_FAILED, EXIT_BAD_INPUT, EXIT_GATED = 1, 2, 3


def standalone_job(recipe_path: Path, database_url: str | None, workdir: Path) -> tuple[JobStore, str]:
    """A job for one recipe file, outside the service (a KubeRay RayJob, `ray job submit`): the recipe
    is validated here, with its relative paths resolved against its own folder, and recorded in a
    job store of its own (SQLite in `workdir` unless a URL is given) so that run_job drives it
    exactly as it drives the service's jobs."""
    recipe = load_recipe(recipe_path)  # RecipeError names the file and the field; nothing written yet
    Path(workdir).mkdir(parents=True, exist_ok=True)
    store = JobStore(database_url or f"sqlite:///{Path(workdir).resolve() / 'sea-convert-jobs.db'}")
    job, _ = store.submit(recipe.name, recipe_json(recipe))
    return store, job.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--job-id", help="a job the service recorded in the database")
    which.add_argument("--recipe", type=Path, help="a recipe file: run it as a job of its own (no service)")
    parser.add_argument("--output-root", type=Path, required=True)
    parser.add_argument("--database-url", default=os.environ.get("SEA_CONVERT_DATABASE_URL"))
    parser.add_argument("--no-ray", action="store_true", help="run the stages in this process (no cluster)")
    args = parser.parse_args(argv)
    if args.recipe is not None:
        try:
            store, job_id = standalone_job(args.recipe, args.database_url, args.output_root)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    elif not args.database_url:
        parser.error("--database-url or SEA_CONVERT_DATABASE_URL is required with --job-id")
    else:
        store, job_id = JobStore(args.database_url), args.job_id
    execute = plain_execute
    if not args.no_ray:
        import ray

        ray.init(log_to_driver=True)  # inside a Ray job: RAY_ADDRESS points at the cluster
        execute = ray_execute
    status = run_job(store, job_id, args.output_root, execute=execute)
    if args.recipe is not None:  # no service reads the store: the outcome goes to the log and the exit code
        job = store.get(job_id)
        print(json.dumps({"job": job_id, "status": status, "error": job.error, "artifact": job.artifact_uri,
                          "perplexity": (job.metrics or {}).get("perplexity")}, indent=2))
        return {"succeeded": 0, "gated": EXIT_GATED}.get(status, EXIT_FAILED)
    return 0 if status in ("succeeded", "gated") else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
