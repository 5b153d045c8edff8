"""benchmarks/prefill_bench.py runs end to end on the CPU (a tiny LLaMA built as the 13B-shaped stack is: meta
device, random weights): the script a GPU call depends on is checked here first. Its CPU times are not figures."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prefill_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "prefill.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_bench.py"), "--model", "tiny", "--device",
                          "cpu", "--tokens", "200", "--batch", "1", "2", "--block-K", "64", "--json", str(out),
                          "--sea-launch", "default", "KPS=2,GATES_IN_EPILOGUE=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(out.read_text())
    assert info["device"] == "cpu" and info["sea"]["predictor_rows"] == "block"
    assert info["sea"]["position_table_len"] == 200  # sized by the script to the longest prompt
    assert [(r["T"], r["batch"]) for r in info["rows"]] == [(200, 1), (200, 2)]
    for r in info["rows"]:
        assert r["dense"]["eager_ms"] > 0 and r["sea"]["eager_ms"] > 0
        assert r["speedup_from"] == "dense eager, SEA eager" and r["speedup"] == r["dense"]["eager_ms"] / r["sea"]["eager_ms"]
    assert "200     2 |" in res.stdout  # the table's rows
    # a second launch setting: SEA timed again under it, with its own speed-up; the first setting is the JSON's
    assert info["forward_launch"]["KPS"] == 1
    for r in info["rows"]:
        other = r["sea@KPS=2,GATES_IN_EPILOGUE=1"]
        assert other["eager_ms"] > 0 and other["speedup"] == r["dense"]["eager_ms"] / other["eager_ms"]


def test_prefill_bench_refuses_a_malformed_launch_setting():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_bench.py"), "--model", "tiny", "--device",
                          "cpu", "--sea-launch", "KPS:2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "--sea-launch 'KPS:2'" in res.stderr
