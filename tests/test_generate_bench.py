"""benchmarks/generate_bench.py runs end to end on the CPU (tiny LLaMA built as the 13B-shaped stack is): the
script a GPU call depends on is checked here first. Its CPU rates are not figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generate_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "generate.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate_bench.py"), "--model", "tiny", "--device",
                          "cpu", "--contexts", "130", "--batch", "1", "2", "--new-tokens", "6", "--block-K", "64",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(out.read_text())
    assert info["device"] == "cpu" and info["sea"]["position_table_len"] == 130 + 6 + 66 + 1  # WARM_STEPS included
    assert info["sea_captured_equals_eager_tokens"] is True  # on the CPU both loops run eagerly: a check of the script
    assert [(r["context"], r["batch"]) for r in info["rows"]] == [(130, 1), (130, 2)]
    for r in info["rows"]:
        # no transformers compile on the CPU
        assert set(r["settings"]) == {"dense, captured steps", "SEA, captured steps", "SEA, generate()"}
        for label, v in r["settings"].items():
            assert "error" not in v, (label, v)
            if label == "SEA, generate()":
                assert v["total_ms"] > 0 and v["prefill_ms"] > 0
                # the rate only where the new tokens outlast the timing's noise (6 tokens of a tiny model on a busy
                # CPU may not): then it is the tokens over the time they took
                if "decode_tokens_per_s" in v:
                    assert v["decode_tokens_per_s"] == pytest.approx(r["batch"] * 6 / ((v["total_ms"] - v["prefill_ms"]) / 1e3))
            else:  # the loop's own timing: the new tokens over the steps that made them
                assert v["decode_tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / v["ms_per_step"])
                assert v["graphs"] == 0 and 1 <= v["warm_steps"] <= 66
