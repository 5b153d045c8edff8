"""scripts/service_e2e.py --in-process-against: the in-process half of the GPU-host run (issue 24) in a call of its
own, against the JSON the service half wrote (its recipe and its job's loss history)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_ray_job import _recipe

ROOT = Path(__file__).resolve().parents[1]


def _against(service: dict, tmp_path: Path, tag: str) -> tuple[subprocess.CompletedProcess, Path]:
    source, out = tmp_path / f"service-{tag}.json", tmp_path / f"in-process-{tag}.json"
    source.write_text(json.dumps(service))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "service_e2e.py"), "--in-process-against", str(source),
                          "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    return res, out


def test_the_in_process_run_is_compared_with_the_service_jobs_loss_history(tmp_path, tiny_model_dir):
    recipe = _recipe(tiny_model_dir)
    recipe["resources"] = {"cpus": 2}
    service = {"recipe": "recipes/smollm2-135m.yaml", "recipe_run": recipe, "job_done_s": 12.5,
               "stage_seconds": {"distill": 5.0}, "distill_history": [{"loss": 1e9}] * 3}
    res, out = _against(service, tmp_path, "other")  # a history this recipe does not give: refused
    assert res.returncode == 1 and "RESULT: NOT ok" in res.stdout, res.stderr[-2000:]
    run = json.loads(out.read_text())["in_process"]
    assert run["steps"] == 3 and run["loss_rel_gap_max"] > 0.99

    service["distill_history"] = run["history"]  # what the same recipe gives: the same losses
    res, out = _against(service, tmp_path, "same")
    assert res.returncode == 0 and "RESULT: ok" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["in_process"]["loss_rel_gap_max"] <= 1e-5 and summary["service_job_done_s"] == 12.5
    assert not list((ROOT / "recipes").glob(".e2e-local-*"))  # the recipe written beside the user's is gone

    del service["recipe_run"]
    res, _ = _against(service, tmp_path, "bad")
    assert res.returncode != 0 and "no recipe_run" in res.stderr
