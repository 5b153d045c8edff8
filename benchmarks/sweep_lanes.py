"""Several quality-sweep processes on one GPU at once, merged into one quality.json.

    python benchmarks/sweep_lanes.py --settings benchmarks/quality_settings.yaml --out OUT \
        --lane i22-ctx2k-A --lane i22-ctx2k-A-hidden4 --lane i22-ctx2k-AB [--split-ruler NAME] [--deadline S]

Why: SmolLM2-135M's training steps and the harness's generation leave the GPU idle most of the time
(launch- and Python-bound), so lanes run side by side finish in little more than the longest lane.
Each --lane is a comma list that one `quality_sweep.py` process runs in order. A lane whose first
setting reuses a setting of another lane waits until that lane has saved its states. --split-ruler NAME
runs NAME's RULER block as one process per (task, mode). Stage budgets are fixed step counts in the
settings, not seconds, so lanes that share the GPU train the same steps as one alone would.
At the deadline every lane still running is stopped; the rows finished by then are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quality_sweep import ruler_task_names  # noqa: E402  (beside this script)

SWEEP = ROOT / "benchmarks" / "quality_sweep.py"
STATE_POLL_S = 2.0


def plan_lanes(settings: list[dict], lanes: list[str], split_ruler: list[str], states: Path) -> list[dict]:
    """One entry per process: {names, args (extra CLI), waits_for (settings other lanes save first)}.
    Lanes save what they train into `states`; a RULER cell trains nothing and saves nothing."""
    by_name = {s["name"]: s for s in settings}
    produced: dict[str, int] = {}
    plan: list[dict] = []
    for lane in lanes:
        names = [n for n in lane.split(",") if n]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"--lane {lane!r}: unknown settings {unknown}")
        plan.append({"names": names, "args": ["--save-predictors", str(states)]})
    for name in split_ruler:
        spec = by_name.get(name, {}).get("ruler")
        if spec is None:
            raise SystemExit(f"--split-ruler {name!r}: no setting of that name with a RULER block")
        for task in ruler_task_names(spec):
            for mode in spec["limits"]:
                plan.append({"names": [name], "args": ["--ruler-task", task, "--ruler-mode", mode,
                                                       "--skip", "passkey,mmlu"]})
    for i, entry in enumerate(plan):
        for n in entry["names"]:
            produced.setdefault(n, i)
    for i, entry in enumerate(plan):  # any setting of the lane, not only its first, may reuse another lane's
        reuses = [by_name[n].get("reuse") for n in entry["names"]]
        entry["waits_for"] = sorted({r for r in reuses if r is not None and produced.get(r, i) != i})
    return plan


def clear_stale(plan: list[dict], states: Path, work: Path) -> None:
    """On a machine kept warm between calls: an earlier call's lane output must not be merged as this call's, and an
    earlier call's states of a setting a lane trains again must not let its waiters start on the old ones."""
    shutil.rmtree(work, ignore_errors=True)
    for entry in plan:
        if "--save-predictors" in entry["args"]:  # a training lane, not a RULER cell
            for name in entry["names"]:
                (states / f"{name}.pt").unlink(missing_ok=True)


def merge(parts: list[dict]) -> dict:
    """Rows of all lanes in lane order; rows of one setting split by RULER cell become one row."""
    merged: dict = {"rows": []}
    rows: dict[str, dict] = {}
    for part in parts:
        for key in ("device", "torch", "base_recipe"):
            merged.setdefault(key, part.get(key))
        for row in part.get("rows", []):
            have = rows.get(row["name"])
            if have is None:
                rows[row["name"]] = row
                merged["rows"].append(row)
                continue
            for mode, cell in row.get("ruler", {}).items():
                into = have.setdefault("ruler", {}).setdefault(mode, {"scores": {}, "samples": {}, "seconds": 0.0})
                into["scores"].update(cell["scores"])
                into["samples"].update(cell["samples"])
                into["seconds"] = round(max(into["seconds"], cell["seconds"]), 1)  # lanes ran side by side
    return merged


def table(merged: dict) -> str:
    """One line per row: steps, SEA and oracle perplexity ratios, RULER scores by mode (lengths in order)."""
    lines = [f"{'setting':28s} {'steps A/B':>9s} {'SEA x':>7s} {'oracle x':>8s}  RULER"]
    for row in merged["rows"]:
        st = row.get("stages", {})
        steps = "/".join(str(st[k]["steps"]) if k in st else "-" for k in ("a", "b"))
        main = row.get("main", {})
        ruler = "; ".join(f"{mode} " + ", ".join(f"{t.removeprefix('sea_ruler_')} "
                                                  + "/".join(f"{v:.2f}" for _, v in sorted(sc.items()))
                                                  for t, sc in cell["scores"].items())
                          for mode, cell in row.get("ruler", {}).items())
        lines.append(f"{row['name']:28s} {steps:>9s} {main.get('sea_ratio', float('nan')):7.4f} "
                     f"{main.get('oracle_ratio', float('nan')):8.4f}  {ruler}")
        for c in row.get("content", []):  # SEA with a content term in its selection (quality_sweep.content_rows)
            key = f"  + content {c['keys']} w={c['weight']}"
            lines.append(f"{key:38s} {c['sea_ratio']:7.4f} {'':8s}  "
                         + (f"pass key {c['passkey']['mean']:.3f}" if c.get("passkey") else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="folder for the merged quality.json and sweep.log")
    ap.add_argument("--lane", action="append", default=[], help="comma list of settings one process runs in order")
    ap.add_argument("--split-ruler", action="append", default=[], help="a setting whose RULER block runs as one "
                    "process per (task, mode)")
    ap.add_argument("--states", type=Path, default=Path("/tmp/states"), help="trained states, saved and reused")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lanes"), help="each lane's own output folder")
    ap.add_argument("--skip", default="", help="extras no lane runs (quality_sweep --skip): passkey, ruler, mmlu, content")
    ap.add_argument("--deadline", type=float, default=None, help="seconds; lanes still running then are stopped")
    args = ap.parse_args()

    settings = yaml.safe_load(args.settings.read_text())["settings"]
    plan = plan_lanes(settings, args.lane, args.split_ruler, args.states)
    if not plan:
        raise SystemExit("nothing to run: give --lane or --split-ruler")
    args.out.mkdir(parents=True, exist_ok=True)
    clear_stale(plan, args.states, args.work)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    pending = list(enumerate(plan))
    running: dict[int, subprocess.Popen] = {}
    logs_open: dict[int, object] = {}
    ended: dict[int, int | str] = {}
    while pending or running:
        for i, entry in list(pending):
            if not all((args.states / f"{w}.pt").is_file() for w in entry["waits_for"]):
                continue
            lane_dir = args.work / str(i)
            lane_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(SWEEP), "--settings", str(args.settings), "--out", str(lane_dir),
                   "--only", ",".join(entry["names"]), "--load-from", str(args.states), *entry["args"]]
            if args.skip and "--skip" not in entry["args"]:
                cmd += ["--skip", args.skip]
            logs_open[i] = (lane_dir / "sweep.log").open("w")
            running[i] = subprocess.Popen(cmd, stdout=logs_open[i], stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            print(f"[{time.perf_counter() - t0:6.0f} s] lane {i} started: {' '.join(entry['names'] + entry['args'])}",
                  flush=True)
            pending.remove((i, entry))
        for i, proc in list(running.items()):
            if proc.poll() is not None:
                ended[i] = proc.returncode
                del running[i]
                print(f"[{time.perf_counter() - t0:6.0f} s] lane {i} ended, exit {proc.returncode}", flush=True)
        if args.deadline is not None and time.perf_counter() - t0 > args.deadline:
            for i, proc in running.items():
                proc.terminate()
                proc.wait()
                ended[i] = "stopped at the deadline"
            for i, _ in pending:
                ended[i] = "never started (its reuse was not saved in time)"
            running, pending = {}, []
        if not running and pending:  # nothing left that could save what they wait for
            for i, entry in pending:
                ended[i] = f"never started: {', '.join(entry['waits_for'])} not saved"
            pending = []
        time.sleep(STATE_POLL_S)

    for handle in logs_open.values():
        handle.close()
    parts, logs = [], []
    for i, entry in enumerate(plan):
        lane_dir = args.work / str(i)
        result = lane_dir / "quality.json"
        if result.is_file():
            parts.append(json.loads(result.read_text()))
        log = lane_dir / "sweep.log"
        text = log.read_text() if log.is_file() else ""
        logs.append(f"===== lane {i}: {' '.join(entry['names'] + entry['args'])} -> {ended.get(i)}\n{text}")
    merged = merge(parts)
    merged["lanes"] = [{"names": e["names"], "args": e["args"], "exit": ended.get(i)} for i, e in enumerate(plan)]
    merged["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "quality.json").write_text(json.dumps(merged, indent=2) + "\n")
    (args.out / "sweep.log").write_text("\n".join(logs))
    print(table(merged))
    print(f"wrote {args.out / 'quality.json'}: {len(merged['rows'])} rows in {merged['wall_seconds']} s")
    for lane in merged["lanes"]:
        print(f"  {','.join(lane['names'])} {' '.join(lane['args'])}: {lane['exit']}")
    if any(v != 0 for v in ended.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
