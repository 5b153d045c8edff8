"""The service's own local Ray head (issue 18, item 6) is reachable from this machine only, and only with the
token the service generated: every socket of its processes (and of its workers and a driver connected to it)
listens on loopback, as the process table shows; the token sits in the service's state folder, mode 0600,
and nowhere in a home folder; clients without it are refused over HTTP and gRPC, clients with it work (a
driver, a task, an actor, a job through the Jobs API); ray-head.json lists what is bound.

A real head on a fresh state folder, with HOME pointing at an empty folder (no ~/.ray/auth_token, from which
Ray would turn token mode on by itself). ~30 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from workers.service.ray_head import (  # noqa: E402
    REQUIRED_ROLES,
    WORKER_PORTS,
    LocalRayHead,
    _is_loopback,
    head_processes,
    listeners,
)

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

# A driver that holds a worker (an actor) until its stdin closes: the test lists the sockets meanwhile
HOLDING_DRIVER = """
import os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=0)
class Holder:
    def pid(self):
        return os.getpid()

@ray.remote(num_cpus=0)
def square(x):
    return x * x

holder = Holder.remote()
print("READY", os.getpid(), ray.get(holder.pid.remote()), ray.get(square.remote(7)), flush=True)
sys.stdin.read()
"""

CONNECT_ONLY = "import sys, ray; ray.init(address=sys.argv[1]); print('CONNECTED', flush=True)"

# A Ray job's driver: it connects as the job's entrypoint does (ray.init() with the RAY_ADDRESS Ray gives it)
JOB_DRIVER = """
import os, ray
ray.init()
print("AUTH", os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN_PATH"))
print("ANSWER", ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secure-head")
    home = folder / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOME", str(home))  # fresh: no ~/.ray/auth_token, and nothing of the run's other heads
        for var in AUTH_VARS:
            env.delenv(var, raising=False)  # the service's own environment says nothing about tokens
        h = LocalRayHead(folder / "state", num_cpus=1)
        dashboard, adopted = h.ensure(timeout=120)
        assert not adopted
        pid = h._read()["pid"]
        try:
            yield h, dashboard, home
        finally:
            assert h.stop()
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
    assert not (home / ".ray").exists(), sorted(str(p) for p in home.rglob("*"))


def _client_env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return {**env, "HOME": str(home), **extra}


def _table(socks: list[dict], roles: dict | None = None) -> str:
    roles = roles or {}
    return "\n".join(f"  {s['address']:<26} {s['proto']} pid {s['pid']:<7} {s['process']:<20} "
                     f"{roles.get(s['address'], '')}" for s in socks)


def _read_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return line
            seen.append(line)
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"no {prefix!r} line from the driver within {timeout} s: {''.join(seen)[-3000:]}")


def test_the_token_is_the_services_own_file_0600_and_never_in_a_record_command_line_or_home(head):
    h, _, home = head
    rec = h._read()
    token_file = Path(rec["token_file"])
    assert token_file == h.token_file and token_file.parent == h.state_dir.absolute()
    st = token_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid(), oct(st.st_mode)
    token = token_file.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # secrets.token_hex(32): Ray's own format
    assert token not in h.record.read_text()
    assert not (home / ".ray").exists()
    for p in head_processes(rec["pid"]):
        assert token not in " ".join(p.cmdline())
    raylet = next(p for p in head_processes(rec["pid"]) if p.name() == "raylet")
    env = raylet.environ()  # what the workers and the job drivers inherit
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token_file)
    assert "RAY_AUTH_TOKEN" not in env and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_every_socket_of_the_head_its_workers_and_a_driver_is_on_loopback(head, capsys):
    h, _, home = head
    rec = h._read()
    driver = subprocess.Popen([sys.executable, "-c", HOLDING_DRIVER, rec["gcs"]], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_client_env(home, **h.env()))
    try:
        _, driver_pid, actor_pid, answer = _read_line(driver, "READY", 120).split()
        assert answer == "49"
        procs = head_processes(rec["pid"])
        assert int(actor_pid) in {p.pid for p in procs}  # the worker is the head's (the raylet's child)
        socks = listeners([*procs, int(driver_pid)])
    finally:
        driver.stdin.close()
        driver.wait(60)
    with capsys.disabled():
        roles = {s["address"]: s["role"] for s in rec["listening"]}
        kinds = {int(actor_pid): "worker (actor)", int(driver_pid): "driver"}
        roles.update({s["address"]: kinds.get(s["pid"], "worker") for s in socks if s["address"] not in roles})
        print(f"\nlistening sockets of the head (pid {rec['pid']}), its workers and a connected driver:\n"
              f"{_table(socks, roles)}")
    exposed = [s for s in socks if not _is_loopback(s["ip"])]
    assert not exposed, f"beyond loopback:\n{_table(exposed)}\nall:\n{_table(socks)}"
    assert all(s["ip"] in ("127.0.0.1", "::ffff:127.0.0.1") for s in socks), _table(socks)
    names = {s["process"] for s in socks}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, _table(socks)
    worker_socks = [s for s in socks if s["pid"] in (int(actor_pid), int(driver_pid))]
    assert len(worker_socks) >= 2, _table(socks)  # the worker's and the driver's own gRPC servers were listed
    assert driver.returncode == 0


def test_clients_without_the_token_are_refused(head):
    h, dashboard, home = head
    rec = h._read()
    agent = next(s["address"] for s in rec["listening"] if s["role"] == "dashboard_agent_http")
    for url in (f"{dashboard}/api/jobs/", f"{dashboard}/api/version", f"http://{agent}/api/job_agent/jobs/x"):
        assert httpx.get(url, timeout=10).status_code == 401, url
        assert httpx.get(url, headers={"Authorization": "Bearer " + "0" * 64}, timeout=10).status_code == 403, url
    # gRPC (the GCS): a driver with no token, and one with a wrong token; each may reach the loopback address
    # (single-machine mode) and gives up after 3 tries
    base = _client_env(home, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_NUM_REDIS_GET_RETRIES="3")
    runs = [subprocess.Popen([sys.executable, "-c", CONNECT_ONLY, rec["gcs"]], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
            for env in (base, {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})]
    for run in runs:
        out, _ = run.communicate(timeout=120)
        assert run.returncode != 0 and "CONNECTED" not in out, out[-2000:]
        assert "Unauthenticated" in out or "InvalidAuthToken" in out, out[-2000:]


def test_clients_with_the_token_work_and_a_job_driver_connects(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    h, dashboard, home = head
    assert httpx.get(f"{dashboard}/api/jobs/", headers=h.auth_headers(), timeout=10).status_code == 200
    out = subprocess.run([sys.executable, "-c", CONNECT_ONLY, h._read()["gcs"]], capture_output=True, text=True,
                         timeout=120, env=_client_env(home, **h.env()))
    assert "CONNECTED" in out.stdout, out.stderr[-2000:]
    script = tmp_path / "driver.py"
    script.write_text(JOB_DRIVER)
    client = JobSubmissionClient(dashboard, headers=h.auth_headers())  # as RayRunner, with the head's token file
    sid = client.submit_job(entrypoint=f"{sys.executable} {script}", entrypoint_num_cpus=0)
    deadline = time.monotonic() + 120
    while not client.get_job_status(sid).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = client.get_job_logs(sid)
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "ANSWER 42" in logs and f"AUTH token {h.token_file}" in logs, logs[-3000:]


def test_the_record_lists_what_is_bound_and_the_head_is_adopted_with_its_token(head):
    h, dashboard, _ = head
    rec = h._read()
    assert rec["node_ip"] == "127.0.0.1" and rec["gcs"].startswith("127.0.0.1:")
    assert rec["dashboard"] == dashboard and rec["token_file"] == str(h.token_file)
    recorded = {(s["address"], s["pid"]) for s in rec["listening"]}
    roles = {s["role"]: s["address"] for s in rec["listening"]}
    assert set(REQUIRED_ROLES) <= set(roles), roles
    assert roles["gcs"].endswith(":" + rec["gcs"].rsplit(":", 1)[1])
    assert roles["dashboard"] == dashboard.removeprefix("http://")
    bound = listeners(head_processes(rec["pid"]))
    # what is bound now: the recorded sockets, and those of the head's worker processes (Ray's worker port range)
    workers = [s for s in bound if (s["address"], s["pid"]) not in recorded]
    assert recorded == {(s["address"], s["pid"]) for s in bound if s not in workers}, (
        f"recorded:\n{json.dumps(rec['listening'], indent=1)}\nbound:\n{_table(bound)}")
    for s in workers:
        port = int(s["address"].rsplit(":", 1)[1])
        assert s["process"].startswith("ray::") and WORKER_PORTS[0] <= port <= WORKER_PORTS[1], _table(bound)
    assert LocalRayHead(h.state_dir).ensure(timeout=10) == (dashboard, True)  # adopted, with its token
    assert LocalRayHead(h.state_dir).recorded_token_file() == h.token_file
