"""The Ray job's body without Ray (stages as plain calls), as the brief asks of worker bodies: per-stage
retries with backoff after a real failure, a recipe that no longer holds failing the job with its
message, and the service loop firing a due schedule into the queue."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from conftest import HELD_OUT_TEXT, TRAIN_TEXT
from workers.service.jobstore import JobStore
from workers.service.ray_job import run_job, stage_options
from workers.service.service_loop import ServiceLoop



def _recipe(model_dir: Path, **output) -> dict:
    return {
        "name": "tiny-plain",
        "model": {"path": str(model_dir)},
        "sea": {"mode": "block", "k": 16, "predictor_length": 32, "block_size": 16, "block_keys": 32},
        "data": {"train": {"path": str(TRAIN_TEXT)}, "held_out": {"path": str(HELD_OUT_TEXT)},
                 "seq_len": 128, "held_out_tokens": 1024, "max_train_tokens": 10000},
        "distill": {"stage_a": {"steps": 3, "batch_size": 2, "lr": 0.003, "warmup_steps": 1}, "device": "cpu"},
        "validate": {"perplexity": {"ctx": 128, "max_windows": 2}, "mmlu": {"enabled": False}, "picture": False},
        "output": {"dir": "tiny-plain", **output},
        "retries": {"attempts": 3, "backoff_s": 2.0},
        "resources": {"cpus": 2, "gpus": 1, "memory_gb": 4, "custom": {"big_disk": 1}},
    }


def test_a_failing_stage_is_retried_after_its_backoff_and_the_job_completes(tmp_path, tiny_model_dir):
    blocker = tmp_path / "bucket"
    blocker.write_text("a file where the publish folder should be")  # publishing fails until it is gone
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job, _ = store.submit("tiny-plain", yaml.safe_dump(_recipe(tiny_model_dir, publish_uri=str(blocker / "tiny"))))
    pauses: list[float] = []

    def pause(seconds: float) -> None:  # the outage ends while the runner waits
        pauses.append(seconds)
        if len(pauses) == 2:
            blocker.unlink()

    status = run_job(store, job.id, tmp_path / "out", sleep=pause)
    done = store.get(job.id)
    assert status == "succeeded", done.error
    assert pauses == [2.0, 4.0]  # backoff_s, then doubled
    assert [(s.name, s.status, s.attempts) for s in done.stages] == [
        ("distill", "succeeded", 1), ("validate", "succeeded", 1), ("publish", "succeeded", 3)]
    assert done.artifact_uri.startswith(str(blocker / "tiny" / "versions"))
    assert (tmp_path / "out" / "tiny-plain" / "report.json").is_file()
    assert run_job(store, job.id, tmp_path / "out") == "succeeded"  # a finished job is never run again


def test_a_recipe_that_no_longer_holds_fails_the_job_naming_the_field(tmp_path, tiny_model_dir):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    recipe = _recipe(tiny_model_dir)
    recipe["model"]["path"] = str(tmp_path / "deleted-since-submission")
    job, _ = store.submit("tiny-plain", yaml.safe_dump(recipe))
    assert run_job(store, job.id, tmp_path / "out") == "failed"
    assert "model.path: model folder not found" in store.get(job.id).error
    assert not (tmp_path / "out").exists()


def test_stage_tasks_ask_for_the_recipes_resources():
    from sea_convert.recipe import parse_recipe

    r = parse_recipe(_recipe(Path(__file__).parent) | {"model": {"hub": "x/y"}})
    assert stage_options(r, "distill") == {"num_cpus": 2, "num_gpus": 1, "max_retries": 0, "max_calls": 1,
                                           "memory": 4 * 2**30, "resources": {"big_disk": 1}}
    assert stage_options(r, "publish") == {"num_cpus": 1, "max_retries": 0}
    # a parallel stage A: the distill task only drives Ray Train; its workers ask for the GPUs themselves
    body = _recipe(Path(__file__).parent) | {"model": {"hub": "x/y"}}
    body["distill"] = body["distill"] | {"stage_a": {"steps": 3, "batch_size": 2}, "parallel": {"workers": 2}}
    parallel = parse_recipe(body)
    assert stage_options(parallel, "distill") == {"num_cpus": 1, "max_retries": 0}
    assert stage_options(parallel, "validate")["num_gpus"] == 1
    # one worker launched under Ray Train (launch_single): the same, the worker holds the GPU
    body["distill"]["parallel"] = {"workers": 1, "launch_single": True}
    assert stage_options(parse_recipe(body), "distill") == {"num_cpus": 1, "max_retries": 0}


def _stage_body():
    return None


def test_a_gpu_stages_options_are_ones_ray_accepts_for_a_task():
    """max_calls (a fresh worker per GPU stage) is a decorator option that `.options()` refuses: the H100 run of
    2026-12-07 failed its validate stage on it. Ray checks options when the task is declared, no cluster needed."""
    ray = pytest.importorskip("ray")
    from sea_convert.recipe import parse_recipe

    r = parse_recipe(_recipe(Path(__file__).parent) | {"model": {"hub": "x/y"}})
    for stage in ("distill", "validate", "publish"):
        opts = stage_options(r, stage)
        task = ray.remote(**opts)(_stage_body)
        assert {k: task._default_options[k] for k in opts} == opts
    assert stage_options(r, "validate")["max_calls"] == 1
    with pytest.raises(ValueError, match="max_calls"):
        ray.remote(_stage_body).options(**stage_options(r, "validate"))


def test_service_loop_fires_a_due_schedule_once(tmp_path, tiny_model_dir):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    sched = store.add_schedule("nightly", "0 2 * * *", "Europe/Paris", yaml.safe_dump(_recipe(tiny_model_dir)))
    loop = ServiceLoop(store, runner=None)
    later = sched.created_at.replace(tzinfo=dt.timezone.utc) + dt.timedelta(days=3)  # three nights missed
    first = loop.tick(later)
    assert len(first["fired"]) == 1 and not first["fired"][0].skipped
    jobs, total = store.list(schedule_id=sched.id)
    assert total == 1 and jobs[0].name == "tiny-plain" and jobs[0].status == "queued"
    assert loop.tick(later)["fired"] == [] and store.list(schedule_id=sched.id)[1] == 1


def test_a_recipe_file_runs_as_a_job_of_its_own_with_relative_paths_from_its_folder(tmp_path, tiny_model_dir, capsys):
    """The entrypoint of the KubeRay RayJob (docker/kuberay/rayjob.yaml): one recipe, no service."""
    import json

    from workers.service.ray_job import main

    recipe = _recipe(tiny_model_dir)
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "foldoc.txt").write_text(TRAIN_TEXT.read_text())
    recipe["data"]["train"]["path"] = "foldoc.txt"  # relative to the recipe file, as `sea-convert run` reads it
    (folder / "job.yaml").write_text(yaml.safe_dump(recipe))
    code = main(["--recipe", str(folder / "job.yaml"), "--output-root", str(tmp_path / "out"), "--no-ray"])
    out = capsys.readouterr().out
    assert code == 0, out
    outcome = json.loads(out[out.rindex("\n{") + 1:])  # the last thing printed: the job's outcome
    assert outcome["status"] == "succeeded" and outcome["error"] is None
    assert outcome["perplexity"]["sea_ppl"] > 0
    assert (Path(outcome["artifact"]) / "sea_predictors.safetensors").exists()
    assert Path(outcome["artifact"]).is_relative_to(tmp_path / "out")
    assert (tmp_path / "out" / "sea-convert-jobs.db").exists()  # the job's own record


def test_a_bad_recipe_file_exits_2_naming_the_file_and_field(tmp_path, capsys):
    from workers.service.ray_job import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {path: /nowhere}\ndata: {train: {path: a.txt}}\nsea: {k: -3}\n")
    code = main(["--recipe", str(bad), "--output-root", str(tmp_path / "out"), "--no-ray"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.yaml" in err and "sea.k" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_a_job_records_its_progress_and_removes_only_what_it_made(tmp_path, tiny_model_dir):
    """The state folder named by the recipe existed before (with a file of its own): the run uses it, and
    afterwards removes only its checkpoints from it; the work folder it made is gone; progress was recorded."""
    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "canary.txt").write_text("was here before")
    recipe = _recipe(tiny_model_dir)
    recipe["distill"] |= {"state_dir": str(existing), "checkpoint_every": 1}
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job, _ = store.submit("tiny-plain", yaml.safe_dump(recipe))
    assert run_job(store, job.id, tmp_path / "out") == "succeeded", store.get(job.id).error
    done = store.get(job.id)
    assert done.progress["stage"] == "distill A" and done.progress["step"] == done.progress["total"] == 3
    assert dt.datetime.fromisoformat(done.progress["updated_at"]).tzinfo is not None
    assert (existing / "canary.txt").read_text() == "was here before"
    assert sorted(p.name for p in existing.iterdir()) == ["canary.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny-plain"]  # no .work, no .state left
    assert {f["path"] for f in done.metrics["manifest"]["files"]} >= {"config.json", "report.json"}


def test_a_window_longer_than_the_model_fails_once_naming_the_field(tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    recipe = _recipe(tiny_model_dir)
    recipe["data"]["seq_len"] = 2 * positions
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job, _ = store.submit("tiny-plain", yaml.safe_dump(recipe))
    assert run_job(store, job.id, tmp_path / "out", sleep=lambda s: None) == "failed"
    done = store.get(job.id)
    assert f"data.seq_len: {2 * positions} is longer than the model's {positions} positions" in done.error
    assert [(s.name, s.status, s.attempts) for s in done.stages] == [  # bad input: never retried
        ("distill", "failed", 1), ("validate", "skipped", 0), ("publish", "skipped", 0)]
    assert not (tmp_path / "out" / "tiny-plain.work").exists()
