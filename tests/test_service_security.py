"""A hostile client with a valid token against the real service (FastAPI app, real SQLite job store):
every path a recipe names stays inside the service's roots, endpoints and credentials are checked,
absurd values and bad tokens get a 4xx naming the problem, quotas answer 429, and nothing on disk is
created or removed by a refused request.

The table of (field, case) -> status is printed by the last test (run with -s to see it)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
import yaml
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from conftest import HELD_OUT_TEXT, TRAIN_TEXT, _free_port

ADMIN = {"Authorization": "Bearer admin-token"}
READER = {"Authorization": "Bearer read-token"}
TABLE: dict[tuple[str, str], int] = {}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model_dir):
    """data/ and outputs/ roots, an outside folder with a canary, and symlinks inside the roots that lead out."""
    box = tmp_path_factory.mktemp("hostile")
    data, outputs, outside = box / "data", box / "outputs", box / "outside"
    for d in (data, outputs, outside):
        d.mkdir()
    (outside / "canary.txt").write_text("do not touch")
    (outside / "secret.csv").write_text("user,password\nalice,hunter2\n")
    (data / "train.txt").write_text(TRAIN_TEXT.read_text()[:50_000])
    (data / "held.txt").write_text(HELD_OUT_TEXT.read_text()[:20_000])
    shutil.copytree(tiny_model_dir, data / "model")  # a model the operator put in the data root
    (data / "escape").symlink_to(outside, target_is_directory=True)
    (outputs / "escape").symlink_to(outside, target_is_directory=True)
    (outputs / "existing").mkdir()
    (outputs / "existing" / "canary.txt").write_text("a folder that was here before")
    return box


@pytest.fixture(scope="module")
def client(sandbox):
    settings = Settings(database_url=f"sqlite:///{sandbox / 'jobs.db'}", admin_tokens="ops:admin-token",
                        read_tokens="viewer:read-token", data_roots=[sandbox / "data"], output_root=sandbox / "outputs",
                        max_body_bytes=4096, runner="off", max_steps=10_000, max_seq_len=8192, max_cpus=64)
    with TestClient(create_app(settings)) as c:
        yield c


def _recipe(**over) -> dict:
    r = {"name": "hostile", "model": {"path": "model"}, "data": {"train": {"path": "train.txt"}, "held_out": {"path": "held.txt"},
                                                                 "seq_len": 64},
         "output": {"dir": "ok"}}
    for key, value in over.items():
        r[key] = {**r[key], **value} if isinstance(value, dict) and isinstance(r.get(key), dict) else value
    return r


def _snapshot(box: Path) -> dict:
    """Every file and folder under the sandbox with its size: what a refused request must leave as it was."""
    return {str(p.relative_to(box)): (p.stat().st_size if p.is_file() else -1)
            for p in box.rglob("*") if p.name not in ("jobs.db", "jobs.db-wal", "jobs.db-shm") and not p.is_symlink()}


def _set(recipe: dict, dotted: str, value) -> dict:
    node = recipe
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return recipe


OUTSIDE = "{box}/outside"
# field -> case -> the value it is set to ({box}: the sandbox). Every one must be refused with a 422 naming the field.
READ_FIELDS = {
    "data.train.path": {"absolute outside": OUTSIDE + "/secret.csv", "..": "../outside/secret.csv",
                        "symlink out": "escape/secret.csv", "root itself": "{box}/data"},
    "data.held_out.path": {"absolute outside": OUTSIDE + "/secret.csv", "..": "../outside/secret.csv",
                           "symlink out": "escape/secret.csv", "root itself": "{box}/data"},
    "model.path": {"absolute outside": OUTSIDE, "..": "../outside", "symlink out": "escape", "root itself": "{box}/data"},
    "validate.harness.include_path": {"absolute outside": OUTSIDE, "..": "../outside", "symlink out": "escape",
                                      "root itself": "{box}/data"},
}
WRITE_FIELDS = {
    "output.dir": {"absolute outside": OUTSIDE + "/new", "..": "../outside/new", "symlink out": "escape/new",
                   "root itself": "{box}/outputs"},
    "distill.state_dir": {"absolute outside": OUTSIDE + "/state", "..": "../outside/state", "symlink out": "escape/state",
                          "root itself": "{box}/outputs", "existing folder": "existing"},
    "output.publish_uri": {"absolute outside": OUTSIDE + "/pub", "..": "../outside/pub", "symlink out": "escape/pub",
                           "root itself": "{box}/outputs", "file:// outside": "file://{box}/outside/pub",
                           "ftp:: chaining": "ftp::/x", "memory:: chaining": "memory::/x"},
    "distill.parallel.checkpoint_uri": {"absolute outside": OUTSIDE + "/dcp", "..": "../outside/dcp",
                                        "symlink out": "escape/dcp", "root itself": "{box}/outputs",
                                        "ftp:: chaining": "ftp::/x"},
}
OTHER_FIELDS = {
    "model.gguf_file": ({"model": {"path": "model", "gguf_file": "../../outside/canary.txt"}}, ".."),
    "model.hub": ({"model": {"hub": str(Path("/etc"))}}, "local folder as hub name"),
    "data.train.hub": ({"data": {"train": {"hub": "../outside"}, "seq_len": 64}}, "local folder as hub name"),
}


def _check_refused(client, sandbox, body: dict, field: str, case: str) -> str:
    before = _snapshot(sandbox)
    details = []
    for route in ("/v1/jobs", "/v1/recipes/validate", "/v1/schedules?name=hostile&cron=0+2+*+*+*"):
        r = client.post(route, content=json.dumps(body), headers={**ADMIN, "Content-Type": "application/json"})
        TABLE[(field, case)] = r.status_code
        assert r.status_code == 422, f"{field} / {case}: {route} -> {r.status_code} {r.text}"
        details.append(r.json()["detail"])
    assert f"  {field}" in details[0] or f"{field}:" in details[0], details[0]
    assert _snapshot(sandbox) == before, f"{field} / {case}: a refused request changed the disk"
    assert (sandbox / "outside" / "canary.txt").read_text() == "do not touch"
    return details[0]


@pytest.mark.parametrize("field,case", [(f, c) for f, cases in {**READ_FIELDS, **WRITE_FIELDS}.items() for c in cases])
def test_every_path_field_is_confined_to_its_root(client, sandbox, field, case):
    value = {**READ_FIELDS, **WRITE_FIELDS}[field][case].format(box=sandbox)
    body = _set(_recipe(), field, value)
    if field == "distill.parallel.checkpoint_uri":
        body["distill"]["parallel"]["workers"] = 1
    detail = _check_refused(client, sandbox, body, field, case)
    if case in ("absolute outside", "..", "symlink out") and field in READ_FIELDS:
        # the same answer whether or not the path exists: validation tells a client nothing about the server's files
        missing = value.replace("secret.csv", "no-such-file.csv") if value.endswith(".csv") else value + "/no-such-file"
        r = client.post("/v1/recipes/validate", content=json.dumps(_set(_recipe(), field, missing)),
                        headers={**ADMIN, "Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"].replace(missing, "P") == detail.replace(value, "P")


@pytest.mark.parametrize("field", sorted(OTHER_FIELDS))
def test_model_files_and_hub_names_cannot_reach_local_files(client, sandbox, field):
    over, case = OTHER_FIELDS[field]
    body = _recipe()
    for key, value in over.items():
        body[key] = value
    _check_refused(client, sandbox, body, field, case)


ENDPOINTS = {
    "endpoint not allowed": ({"publish_uri": "s3://bucket/x", "storage_options": {"client_kwargs": {"endpoint_url": "http://10.0.0.5:9000"}}},
                             "output.storage_options", "not an allowed endpoint"),
    "credentials in recipe": ({"publish_uri": "s3://bucket/x", "storage_options": {"key": "AKIA", "secret": "s"}},
                              "output.storage_options", "credentials do not go in a recipe"),
    "nested credentials": ({"publish_uri": "s3://bucket/x", "storage_options": {"client_kwargs": {"aws_secret_access_key": "s"}}},
                           "output.storage_options", "credentials do not go in a recipe"),
    "other option": ({"publish_uri": "s3://bucket/x", "storage_options": {"config_kwargs": {"proxies": {"https": "http://evil"}}}},
                     "output.storage_options", "not allowed by the service"),
}


@pytest.mark.parametrize("case", sorted(ENDPOINTS))
def test_endpoints_come_from_the_allow_list_and_credentials_from_the_environment(client, sandbox, case):
    output, field, expected = ENDPOINTS[case]
    detail = _check_refused(client, sandbox, _recipe(output={"dir": "ok", **output}), field, case)
    assert expected in detail


def test_the_provider_s_own_endpoint_and_a_listed_one_pass(client, sandbox):
    for endpoint in ("https://s3.eu-west-1.amazonaws.com", None):
        options = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"}} if endpoint else {}
        r = client.post("/v1/recipes/validate", headers={**ADMIN, "Content-Type": "application/json"}, content=json.dumps(
            _recipe(output={"dir": "ok", "publish_uri": "s3://bucket/x", "storage_options": options})))
        assert r.status_code == 200, r.text


ABSURD = {
    "distill.stage_a.steps": (10**12, "above the service's maximum"),
    "distill.stage_a.lr": (float("inf"), "finite number"),
    "data.seq_len": (10**9, "above the service's maximum"),
    "resources.cpus": (1000, "above the service's maximum"),
    "distill.stage_a.batch_size": (10**7, "above the service's maximum"),
}


@pytest.mark.parametrize("field", sorted(ABSURD))
def test_absurd_values_are_refused_naming_the_field(client, sandbox, field):
    value, expected = ABSURD[field]
    detail = _check_refused(client, sandbox, _set(_recipe(), field, value), field, "absurd")
    assert expected in detail


def test_booleans_are_not_numbers_and_infinity_is_not_a_rate(client, sandbox):
    for field, value, text in (("distill.stage_a.steps", True, "steps: true"), ("distill.stage_a.lr", None, "lr: .inf"),
                               ("distill.stage_a.lr", None, "lr: Infinity")):
        body = yaml.safe_dump(_recipe()) + {"steps: true": "distill:\n  stage_a:\n    steps: true\n",
                                            "lr: .inf": "distill:\n  stage_a:\n    lr: .inf\n",
                                            "lr: Infinity": "distill:\n  stage_a:\n    lr: Infinity\n"}[text]
        r = client.post("/v1/jobs", content=body, headers=ADMIN)
        TABLE[(field, text)] = r.status_code
        assert r.status_code == 422 and field in r.json()["detail"], (text, r.text)
    r = client.post("/v1/jobs", content='{"name": "x", "distill": {"stage_a": {"lr": Infinity}}}',
                    headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 422 and "distill.stage_a.lr" in r.json()["detail"]


@pytest.mark.parametrize("header", ["Bearer tökén", "Bearer " + "x" * 100_000, "Bearer \x00\x01", "bearer", "Basic YWRtaW4=",
                                    "Bearer admin-token\u00e9"])
def test_any_authorization_header_gets_401_never_500(client, header):
    raw = header.encode("utf-8")
    # httpx refuses non-ASCII str headers: send the UTF-8 bytes, as a hostile client would
    r = client.get("/v1/jobs", headers={"Authorization": raw})
    TABLE[("Authorization", header[:20])] = r.status_code
    assert r.status_code == 401, r.text


def test_read_token_gets_403_on_every_mutating_route(client):
    body = yaml.safe_dump(_recipe(output={"dir": "ro"}))
    answers = {
        "POST /v1/jobs": client.post("/v1/jobs", content=body, headers=READER),
        "POST /v1/jobs/{id}/cancel": client.post("/v1/jobs/any/cancel", headers=READER),
        "POST /v1/schedules": client.post("/v1/schedules", params={"name": "n", "cron": "0 2 * * *"}, content=body,
                                          headers=READER),
        "DELETE /v1/schedules/{id}": client.delete("/v1/schedules/any", headers=READER),
    }
    assert {route: r.status_code for route, r in answers.items()} == dict.fromkeys(answers, 403)


def test_one_active_job_per_output_folder_and_the_audit_trail(client, sandbox):
    first = client.post("/v1/jobs", content=yaml.safe_dump(_recipe(output={"dir": "race"})), headers=ADMIN)
    assert first.status_code == 201, first.text
    job = first.json()
    assert job["submitted_by"] == "ops" and "admin-token" not in first.text
    second = client.post("/v1/jobs", content=yaml.safe_dump(_recipe(output={"dir": "./race/"})), headers=ADMIN)
    assert second.status_code == 409 and job["id"] in second.json()["detail"]
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ADMIN).json()
    assert cancelled["cancelled_by"] == "ops"
    stored = client.app.state.store.get(job["id"])
    recipe = json.loads(stored.recipe)  # the job runs the resolved paths that were checked
    assert recipe["output"]["dir"] == str((sandbox / "outputs" / "race").resolve())
    assert recipe["data"]["train"]["path"] == str((sandbox / "data" / "train.txt").resolve())
    assert recipe["model"]["path"] == str((sandbox / "data" / "model").resolve())


def test_quotas_answer_429_with_retry_after(sandbox, tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'q.db'}", admin_tokens="a:one,b:two", data_roots=[sandbox / "data"],
                        output_root=sandbox / "outputs", runner="off", max_active_jobs=2, max_submissions_per_minute=3)
    with TestClient(create_app(settings)) as c:
        def submit(token: str, folder: str, key: str | None = None):
            headers = {"Authorization": f"Bearer {token}", **({"Idempotency-Key": key} if key else {})}
            return c.post("/v1/jobs", content=yaml.safe_dump(_recipe(output={"dir": folder})), headers=headers)

        assert [submit("one", f"q{i}").status_code for i in range(2)] == [201, 201]
        busy = submit("one", "q2")
        assert busy.status_code == 429 and "2 jobs queued or running" in busy.json()["detail"]
        assert int(busy.headers["Retry-After"]) >= 1
        assert submit("two", "q3").status_code == 201  # a quota is per token
        for job in c.get("/v1/jobs", headers={"Authorization": "Bearer one"}).json()["items"]:
            if job["submitted_by"] == "a":
                c.post(f"/v1/jobs/{job['id']}/cancel", headers={"Authorization": "Bearer one"})
        assert submit("one", "q4", key="k").status_code == 201  # third submission this minute
        assert submit("one", "q4", key="k").status_code == 200  # a replay spends nothing
        rate = submit("one", "q5")
        assert rate.status_code == 429 and "submissions in the last minute" in rate.json()["detail"]
        assert 1 <= int(rate.headers["Retry-After"]) <= 60
        TABLE[("quota", "active jobs")], TABLE[("quota", "per minute")] = busy.status_code, rate.status_code


def _rss_kb(pid: int) -> int:
    return int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:")))


def test_a_chunked_oversized_body_is_cut_at_the_limit_and_memory_stays_flat(sandbox, tmp_path):
    port = _free_port()
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'b.db'}", admin_tokens="admin-token", read_tokens="read-token",
                        data_roots=[sandbox / "data"], output_root=sandbox / "outputs", runner="off", max_body_bytes=1_000_000)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        before = _rss_kb(os.getpid())
        chunk = b"#" * (1 << 20)
        sent = 0
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/recipes/validate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer read-token\r\n"
                      b"Transfer-Encoding: chunked\r\nContent-Type: application/yaml\r\n\r\n")
            s.settimeout(5)
            try:
                while sent < 300 << 20:  # 300 MB, as a hostile client would send
                    s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                pass  # the server answered and closed: the rest is never read
            answer = s.recv(65536).decode("latin-1", "replace")
        grown_mb = (_rss_kb(os.getpid()) - before) / 1024
        TABLE[("body", "300 MB chunked")] = int(answer.split()[1]) if answer else 0
        print(f"\nchunked body: {sent >> 20} MB sent before the server's answer; the process grew {grown_mb:.1f} MB")
        assert answer.startswith("HTTP/1.1 413"), answer[:200]
        assert grown_mb < 50, f"the service grew by {grown_mb:.0f} MB reading a refused body"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_print_the_table():
    """Runs last in this file: the (field, case) -> status table for the record."""
    assert TABLE, "the tests above filled the table"
    width = max(len(f) for f, _ in TABLE) + 2
    print(f"\nhostile-recipe suite: {len(TABLE)} cases")
    print(f"{'field':<{width}}{'case':<28}status")
    for (field, case), code in sorted(TABLE.items()):
        print(f"{field:<{width}}{case:<28}{code}")
    assert all(400 <= code < 500 for code in TABLE.values())
