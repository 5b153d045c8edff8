"""The autoscaler for real on this machine: Ray's fake multi-node provider (docker/ray/fake-cluster.yaml)
starts worker "nodes" as local Ray processes. The worker type offers the custom resource `sea_gpu`,
which the head lacks; a conversion submitted to the service with `resources.custom: {sea_gpu: 1}` is
pending demand the autoscaler must meet: workers go 0 -> 1, the job's heavy stages run there, and the
worker is removed once idle for idle_timeout_minutes. Prints the timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from api.app import create_app  # noqa: E402
from api.settings import Settings  # noqa: E402
from conftest import service_data_roots  # noqa: E402
from test_service_ray import ADMIN, _recipe, _submit, _wait  # noqa: E402
from workers.service.ray_head import HEAD_ENV, LocalRayHead, _alive, _auth_headers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAKE_CLUSTER = ROOT / "docker" / "ray" / "fake-cluster.yaml"
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    """The head of a fake multi-node cluster on free ports, in its own process group (with the fake worker
    nodes its autoscaler starts), stopped through that group: no other Ray on the machine is touched."""
    from ray._private.services import get_node_ip_address

    from conftest import _free_port

    folder = tmp_path_factory.mktemp("fake-cluster")
    config = yaml.safe_load(FAKE_CLUSTER.read_text())
    gcs, dash = _free_port(), _free_port()
    config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{gcs}"  # where the fake worker nodes join
    # 6 s, not the file's 15: the removal of an idle worker is the property, not the length of the wait
    # (a stage's worker idles < 2 s between stages here, so none is removed mid-job)
    config["idle_timeout_minutes"] = 0.1
    (folder / "cluster.yaml").write_text(json.dumps(config))
    env = {**os.environ, **HEAD_ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    cmd = [RAY, "start", "--head", "--block", f"--autoscaling-config={folder / 'cluster.yaml'}", "--num-cpus=1",
           f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
    with open(folder / "head.log", "ab") as logfile:
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash}"
    head = LocalRayHead(folder / "state")  # recorded as the service records its head: stopped the same way
    head.write_record(proc.pid, dashboard, f"127.0.0.1:{gcs}")
    try:
        _until(lambda: _alive(dashboard) or proc.poll() is not None, 120, "the fake cluster's head to answer")
        assert proc.poll() is None, (folder / "head.log").read_text()[-2000:]
        yield {**config, "dashboard": dashboard}
    finally:
        head.stop()


def _sea_gpu_workers(dashboard: str) -> int:
    from ray.util.state import list_nodes

    _auth_headers()  # turns this process's token mode on when the head uses it, as the service does
    nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return sum(1 for n in nodes if n.resources_total.get("sea_gpu"))


def _monitor_events() -> str:
    # every head of this run keeps its session in conftest's per-run Ray folder; only the fake cluster's
    # autoscaler launches gpu_worker nodes
    logs = sorted((Path(os.environ["RAY_TMPDIR"]) / "ray").glob("session_2*/logs/monitor*"))
    return "".join(p.read_text(errors="replace") for p in logs if p.is_file())


def _ray_version() -> str:
    import ray

    return ray.__version__


def _until(predicate, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


TIMINGS: dict = {}  # both runs, for the JSON


@pytest.mark.parametrize("train_workers", [1, 2], ids=["one-stage-task", "ray-train-2-workers"])
def test_gpu_demand_scales_workers_up_from_zero_and_idle_workers_are_removed(fake_cluster, tiny_model_dir, tmp_path,
                                                                             tmp_path_factory, train_workers):
    """One job whose stages each ask for one sea_gpu (one worker), then one whose distill stage runs
    Ray Train with two workers that each ask for one (two workers at once)."""
    idle_s, dashboard = 60 * fake_cluster["idle_timeout_minutes"], fake_cluster["dashboard"]
    assert fake_cluster["available_node_types"]["gpu_worker"]["min_workers"] == 0
    _until(lambda: _sea_gpu_workers(dashboard) == 0, idle_s + 90, "an empty start (the previous job's workers gone)")

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", admin_tokens="admin",
                        output_root=tmp_path / "outputs", state_dir=tmp_path / "state", ray_address=dashboard,
                        job_python=sys.executable, poll_interval_s=0.5, ray_autoscales=True,
                        data_roots=service_data_roots(tmp_path_factory))
    recipe = _recipe(tiny_model_dir, f"autoscaled-{train_workers}", resources={"cpus": 1, "custom": {"sea_gpu": 1}})
    if train_workers > 1:
        recipe["distill"]["parallel"] = {"workers": train_workers, "launcher": "ray", "cpus_per_worker": 1}
    with TestClient(create_app(settings)) as client:
        t_submit = time.monotonic()
        job_id = _submit(client, recipe)
        scale_up_s = _until(lambda: _sea_gpu_workers(dashboard) >= train_workers, 180, f"scale-up to {train_workers} sea_gpu workers")
        job = _wait(client, job_id, timeout=300)
        job_s = time.monotonic() - t_submit
        log = client.get(f"/v1/jobs/{job_id}/logs", headers=ADMIN).text
    assert job["status"] == "succeeded", job
    assert [(s["name"], s["status"]) for s in job["stages"]] == [
        ("distill", "succeeded"), ("validate", "succeeded"), ("publish", "succeeded")]
    assert "[validate] SEA perplexity" in log
    assert "[distill] stage A step 8" in log or f"stage A on {train_workers} Ray Train workers" in log
    assert job["metrics"]["perplexity"]["sea_ppl"] > 0
    # The head offers no sea_gpu: distill and validate can only have run on the added workers.
    assert _sea_gpu_workers(dashboard) <= fake_cluster["available_node_types"]["gpu_worker"]["max_workers"]

    scale_down_s = _until(lambda: _sea_gpu_workers(dashboard) == 0, idle_s + 90, "scale-down of the idle worker")
    # the autoscaler's own account: it launched for the demand and removed the worker for being idle
    # (its event summary is written once per update, so it may trail the node's removal by a moment)
    _until(lambda: "node(s) of type gpu_worker" in _monitor_events() and "gpu_worker (idle)" in _monitor_events(), 60,
           "the autoscaler's event summary of the launch and the idle removal")

    rows = [(f"submit -> {train_workers} sea_gpu worker(s) alive", scale_up_s), ("submit -> job succeeded", job_s),
            ("job end -> workers back to 0", scale_down_s), ("idle timeout (config)", idle_s)]
    TIMINGS[f"{train_workers} sea_gpu at once"] = {**{name: round(sec, 1) for name, sec in rows}, "job": job["status"]}
    if os.environ.get("SEA_RESULTS_DIR"):  # docs/results/autoscaling_fake.json comes from here
        out = Path(os.environ["SEA_RESULTS_DIR"]) / "autoscaling_fake.json"
        out.write_text(json.dumps({"config": str(FAKE_CLUSTER.relative_to(ROOT)), "ray": _ray_version(),
                                   "runs": TIMINGS}, indent=2) + "\n")
    print(f"\nfake multi-node autoscaling (workers min 0, max 2), stage tasks asking for {train_workers} sea_gpu:")
    for name, seconds in rows:
        print(f"  {name:40s} {seconds:7.1f} s")
    print(f"  job {job_id}: {job['status']}, SEA ppl {job['metrics']['perplexity']['sea_ppl']:.3f}; the worker's idle"
          " clock starts when validate ends, publish runs on the head after it")
