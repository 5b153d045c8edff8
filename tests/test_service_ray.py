"""The service on a real local Ray head: jobs submitted over REST run as Ray jobs (stages as Ray
tasks), publish to a real S3-protocol server, stream their logs, are gated, fail, are cancelled,
survive a service restart and a lost Ray record, all recorded in a real SQLite database.

One head serves the module (it starts in ~5 s); each job trains a tiny LLaMA for a few steps.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

pytest.importorskip("ray")
fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from api.app import create_app  # noqa: E402
from api.settings import Settings  # noqa: E402
from conftest import HELD_OUT_TEXT, RAY_HEAD_CPUS, TRAIN_TEXT, make_bucket, s3_options, s3_recipe_options, service_data_roots  # noqa: E402
from workers.service.jobstore import JobStore  # noqa: E402
from workers.service.ray_head import LocalRayHead  # noqa: E402

ADMIN = {"Authorization": "Bearer admin"}
FINAL = ("succeeded", "failed", "gated", "cancelled")


def _recipe(model_dir: Path, name: str, steps: int = 8, **over) -> dict:
    r = {
        "name": name,
        "model": {"path": str(model_dir)},
        "sea": {"mode": "block", "k": 16, "predictor_length": 32, "block_size": 16, "block_keys": 32},
        "data": {"train": {"path": str(TRAIN_TEXT)}, "held_out": {"path": str(HELD_OUT_TEXT)},
                 "seq_len": 128, "held_out_tokens": 2048, "max_train_tokens": 20000},
        "distill": {"stage_a": {"steps": steps, "batch_size": 2, "lr": 0.003, "warmup_steps": 1}, "device": "cpu"},
        "validate": {"perplexity": {"ctx": 128, "max_windows": 4}, "mmlu": {"enabled": False}, "picture": False},
        "output": {"dir": name},
        "retries": {"attempts": 2, "backoff_s": 0.5},
    }
    for key, value in over.items():
        r[key] = {**r[key], **value} if isinstance(value, dict) and key in r else value
    return r


@pytest.fixture(scope="module")
def settings(tmp_path_factory, ray_head, s3_endpoint):
    """The service on the run's shared Ray head (its state folder: the service adopts the head recorded there)."""
    root = tmp_path_factory.mktemp("service")
    return Settings(database_url=f"sqlite:///{root / 'jobs.db'}", admin_tokens="admin", output_root=root / "outputs",
                    state_dir=ray_head.state_dir, ray_num_cpus=RAY_HEAD_CPUS, poll_interval_s=0.5,
                    stop_local_ray="never", data_roots=service_data_roots(tmp_path_factory),
                    allowed_endpoints=[s3_endpoint])


@pytest.fixture
def client(settings):  # one service per test, on the module's head (adopted), as after a restart
    with TestClient(create_app(settings)) as c:
        yield c


def _submit(client, recipe: dict) -> str:
    r = client.post("/v1/jobs", content=yaml.safe_dump(recipe), headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["id"]


# Time limits catch a hang, nothing more: a job of these recipes takes 11-21 s here (2 cores, a shared head)
# and its first step is logged within ~10 s, so each limit is 10x or more above what it waits for.
def _wait(client, job_id: str, until=FINAL, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
        if job["status"] in until:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")


def _wait_log(client, job_id: str, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}/logs", headers=ADMIN)
        if text in r.text:
            return r.text
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in the log of job {job_id} after {timeout} s")


def test_job_runs_as_ray_tasks_publishes_to_s3_and_pulls_back(client, settings, tiny_model_dir, s3_endpoint, tmp_path):
    import torch

    from sea_convert import checkpoint
    from sea_convert.data import build_splits, eval_windows
    from sea_convert.evaluate import compare_perplexity
    from sea_convert.recipe import parse_recipe
    from workers.pipeline.storage import MANIFEST, pull

    bucket = make_bucket(s3_endpoint, "service-publish")
    uri = f"s3://{bucket}/tiny"
    recipe = _recipe(tiny_model_dir, "tiny-published",
                     output={"publish_uri": uri, "storage_options": s3_recipe_options(s3_endpoint)})
    job_id = _submit(client, recipe)
    streamed = client.get(f"/v1/jobs/{job_id}/logs", params={"follow": True}, headers=ADMIN).text  # ends with the job
    job = _wait(client, job_id)
    assert job["status"] == "succeeded", job
    assert [(s["name"], s["status"], s["attempts"]) for s in job["stages"]] == [
        ("distill", "succeeded", 1), ("validate", "succeeded", 1), ("publish", "succeeded", 1)]
    for line in ("[distill] stage A step 8", "[validate] SEA perplexity", "stage publish: attempt 1", "succeeded"):
        assert line in streamed, line
    assert "(run_stage pid=" in streamed  # the stages ran as Ray tasks, in worker processes
    art = client.get(f"/v1/jobs/{job_id}/artifacts", headers=ADMIN).json()
    assert art["artifact_uri"].startswith(uri + "/versions/") and art["log"] == f"/v1/jobs/{job_id}/logs"
    assert art["published"]["uri"] == art["artifact_uri"] and len(art["content_hash"]) == 64
    config = next(f for f in art["files"] if f["path"] == "config.json")
    got = client.get(config["download"], headers=ADMIN)  # the checkpoint, through the API, with its checksum
    assert got.status_code == 200 and got.headers["X-Checksum-SHA256"] == config["sha256"]
    assert hashlib.sha256(got.content).hexdigest() == config["sha256"] and len(got.content) == config["size"]
    assert client.get(f"/v1/jobs/{job_id}/artifacts/files/../jobs.db", headers=ADMIN).status_code == 404
    prov = job["metrics"]["provenance"]
    assert prov["data"]["train"]["sha256"] and prov["model"]["config_sha256"]
    assert not (settings.output_root / "tiny-published.work").exists()  # the run cleaned its hand-over files

    # pull the published version back, verify every checksum, and score it: the job's own number
    import s3fs
    fs = s3fs.S3FileSystem(**s3_options(s3_endpoint))
    assert fs.exists(f"{art['artifact_uri']}/{MANIFEST}")
    pull(uri, tmp_path / "pulled", storage_options=s3_options(s3_endpoint))
    model, tokenizer = checkpoint.load(tmp_path / "pulled")
    splits = build_splits(parse_recipe(recipe).data, tokenizer)
    res = compare_perplexity(model, eval_windows(splits.held_out, 128, 4))
    want = job["metrics"]["perplexity"]["sea_ppl"]
    print(f"pulled checkpoint: SEA ppl {res.sea_ppl:.4f}, job reported {want:.4f}")
    assert res.sea_ppl == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(torch.tensor(res.teacher_ppl))


def test_missed_gate_is_recorded_with_its_numbers_and_not_published(client, settings, tiny_model_dir):
    pub = settings.output_root / "published-gated"
    job_id = _submit(client, _recipe(tiny_model_dir, "tiny-gated", validate={"gates": {"max_ppl_ratio": 1.000001}},
                                     output={"publish_uri": str(pub)}))
    job = _wait(client, job_id)
    assert job["status"] == "gated" and "max_ppl_ratio" in job["error"], job
    assert job["metrics"]["perplexity"]["ppl_ratio"] > 1.000001 and job["metrics"]["gates_passed"] is False
    assert [s["status"] for s in job["stages"]] == ["succeeded", "succeeded", "skipped"]
    assert not (settings.output_root / "tiny-gated").exists() and not pub.exists()
    assert job["artifact_uri"] is None


def test_failing_stage_is_retried_then_fails_the_job_with_its_error(client, settings, tiny_model_dir):
    blocker = settings.output_root / "blocked"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the publish folder should be")  # publishing fails on every attempt
    job_id = _submit(client, _recipe(tiny_model_dir, "tiny-fails", output={"publish_uri": str(blocker / "tiny")}))
    job = _wait(client, job_id)
    assert job["status"] == "failed" and job["error"].startswith("stage publish:"), job
    assert [(s["status"], s["attempts"]) for s in job["stages"]] == [("succeeded", 1), ("succeeded", 1), ("failed", 2)]
    log = client.get(f"/v1/jobs/{job_id}/logs", headers=ADMIN).text
    assert "stage publish: retrying in 0.5 s" in log and "Traceback" in log
    assert not (settings.output_root / "tiny-fails.work").exists()  # a failed job leaves no work folder


def test_bad_input_and_a_stage_no_node_can_run_fail_at_once_naming_the_field(client, settings, tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("far too little text to train on.\n")
    jobs = {"short": _submit(client, _recipe(tiny_model_dir, "tiny-short", data={"train": {"path": str(short)}})),
            "cpus": _submit(client, _recipe(tiny_model_dir, "tiny-huge", resources={"cpus": 1000}))}
    short_job, huge = _wait(client, jobs["short"]), _wait(client, jobs["cpus"], timeout=60)
    assert short_job["status"] == "failed" and "data.train" in short_job["error"] and "too few" in short_job["error"]
    assert huge["status"] == "failed" and "resources.cpus asks for 1000 CPU" in huge["error"], huge
    for job in (short_job, huge):  # bad input is never retried
        assert [(s["status"], s["attempts"]) for s in job["stages"]] == [("failed", 1), ("skipped", 0), ("skipped", 0)]


def test_cancel_stops_the_ray_job_and_its_stage_task(client, settings, tiny_model_dir):
    from ray.job_submission import JobStatus

    job_id = _submit(client, _recipe(tiny_model_dir, "tiny-cancelled", steps=5000))
    _wait_log(client, job_id, "[distill] stage A step")
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    runner = client.app.state.runtime.runner
    deadline = time.monotonic() + 60
    while runner.client.get_job_status(f"sea-{job_id}") != JobStatus.STOPPED and time.monotonic() < deadline:
        time.sleep(0.5)
    assert runner.client.get_job_status(f"sea-{job_id}") == JobStatus.STOPPED
    for _ in range(60):  # the stage task's worker goes with its driver
        if subprocess.run(["pgrep", "-f", "ray::run_stage"], capture_output=True).returncode != 0:
            break
        time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", "ray::run_stage"], capture_output=True).returncode != 0, "a stage task still runs"
    time.sleep(1.5)  # the driver is gone: nothing overwrites the record
    job = client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
    assert job["status"] == "cancelled" and job["stages"][0]["status"] == "cancelled", job
    assert job["progress"]["stage"] == "distill A" and 0 < job["progress"]["step"] < 5000  # it was training
    assert not (settings.output_root / "tiny-cancelled").exists()
    work = settings.output_root / "tiny-cancelled.work"
    for _ in range(40):  # the service loop removes the stopped job's work folder
        if not work.exists():
            break
        time.sleep(0.5)
    assert not work.exists(), "a cancelled job left its work folder"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=ADMIN).status_code == 409


def test_service_restart_mid_job_completes_the_job_once(settings, tiny_model_dir):
    """The service stops while the job trains; its Ray head stays for the job (stop_local_ray: idle);
    a new service adopts the head and the job finishes, submitted and run once."""
    idle = settings.model_copy(update={"stop_local_ray": "idle"})
    with TestClient(create_app(idle)) as c1:
        job_id = _submit(c1, _recipe(tiny_model_dir, "tiny-restart", steps=150))
        _wait_log(c1, job_id, "[distill] stage A step")
    assert LocalRayHead(settings.state_dir)._read() is not None  # left up: a job was running
    assert JobStore(settings.database_url).get(job_id).status == "running"
    with TestClient(create_app(idle)) as c2:
        job = _wait(c2, job_id)
        runner = c2.app.state.runtime.runner
        mine = [j for j in runner.client.list_jobs() if (j.metadata or {}).get("sea_convert_job") == job_id]
    assert job["status"] == "succeeded", job
    assert len(mine) == 1 and [s["attempts"] for s in job["stages"]] == [1, 1, 1]


def test_job_lost_by_ray_is_queued_again_and_completes(settings, tiny_model_dir):
    """A record that says running under a submission Ray does not know (its head was replaced),
    found by a service that starts afterwards."""
    store = JobStore(settings.database_url)
    job, _ = store.submit("tiny-lost", yaml.safe_dump(_recipe(tiny_model_dir, "tiny-lost")))
    store.set_status(job.id, "running")
    store.record(job.id, ray_submission_id="sea-from-a-head-that-is-gone")
    with TestClient(create_app(settings)) as client:
        done = _wait(client, job.id)
    assert done["status"] == "succeeded" and done["metrics"]["requeued"] == 1
    assert store.get(job.id).ray_submission_id == f"sea-{job.id}"


@contextmanager
def _token_mode(token_file: Path):
    """RAY_AUTH_MODE=token with this test's own token (Ray's format) in `token_file`, for this process and the
    head it starts. Ray caches the mode and the token per process at first use, so the cache is reset on
    the way in and out (Ray's own tests do the same): the test holds whatever ran before or after it."""
    import secrets

    from ray._private.authentication_test_utils import reset_auth_token_state

    token_file.write_text(secrets.token_hex(32))
    try:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("RAY_AUTH_TOKEN", raising=False)
            env.setenv("RAY_AUTH_MODE", "token")
            env.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
            reset_auth_token_state()
            yield
    finally:
        reset_auth_token_state()  # after the variables are back


def test_a_head_with_token_authentication_is_seen_alive_and_stopped(tmp_path):
    """RAY_AUTH_MODE=token (a user's choice, and what ray.init leaves in its process's environment): the
    dashboard answers 401 to a client without Ray's token, so the health check sends it as Ray's job client does."""
    from ray._common.utils import get_ray_address_file

    pointer = Path(get_ray_address_file(None))
    with _token_mode(tmp_path / "auth_token"):
        head = LocalRayHead(tmp_path / "state", num_cpus=1)
        dashboard, adopted = head.ensure(timeout=90)
        try:
            assert not adopted
            assert httpx.get(f"{dashboard}/api/version", timeout=5).status_code == 401  # without the token
            assert LocalRayHead(tmp_path / "state").ensure(timeout=10) == (dashboard, True)  # seen alive: adopted
            gcs = head._read()["gcs"]
            # `ray start` leaves its address for a later ray.init(), once its node is up (soon after the dashboard)
            deadline = time.monotonic() + 30
            while not (pointer.exists() and pointer.read_text().strip() == gcs) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert pointer.read_text().strip() == gcs
        finally:
            assert head.stop()
    # and stopping the head takes it back: a user's ray.init() would otherwise try to join the dead head
    assert not pointer.exists() or pointer.read_text().strip() != gcs
