"""benchmarks/sweep_lanes.py plans side-by-side quality-sweep processes and merges what they write: a lane that
reuses another lane's setting waits for it, a RULER block split per (task, mode) comes back as one row, and
states are saved whole or not at all. (The processes themselves are the sweep's own; a CPU run of two lanes and a
split RULER block was made by hand, see docs/quality.md.)"""

import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_sweep  # noqa: E402
import sweep_lanes  # noqa: E402

SETTINGS = yaml.safe_load((ROOT / "benchmarks" / "quality_settings.yaml").read_text())["settings"]
STATES = Path("/tmp/states")


def test_a_lane_waits_only_for_a_setting_another_lane_trains():
    plan = sweep_lanes.plan_lanes(SETTINGS, ["i22-ctx2k-A", "i22-ctx2k-AB", "i22-ctx2k-A-hidden4,i22-ctx2k-AB-lm"],
                                  [], STATES)
    assert [e["waits_for"] for e in plan] == [[], ["i22-ctx2k-A"], ["i22-ctx2k-A"]]
    # in one lane the reuse is trained first by the same process: no wait
    alone = sweep_lanes.plan_lanes(SETTINGS, ["i22-ctx2k-A,i22-ctx2k-AB"], [], STATES)
    assert alone[0]["waits_for"] == []
    # a reuse that no lane of this call trains is read from saved states (an earlier call): no wait either
    later = sweep_lanes.plan_lanes(SETTINGS, ["i22-ctx2k-AB"], [], STATES)
    assert later[0]["waits_for"] == []
    assert all(e["args"][:2] == ["--save-predictors", str(STATES)] for e in plan)


def test_a_split_ruler_block_runs_one_process_per_task_and_mode():
    plan = sweep_lanes.plan_lanes(SETTINGS, ["i22-ctx8k-A,i22-ctx8k-AB"], ["i22-ctx8k-AB-ruler-rest"], STATES)
    cells = plan[1:]
    spec = next(s for s in SETTINGS if s["name"] == "i22-ctx8k-AB-ruler-rest")["ruler"]
    assert len(cells) == len(spec["names"]) * len(spec["limits"])
    assert {(c["args"][1], c["args"][3]) for c in cells} == {(t, m) for t in spec["names"] for m in spec["limits"]}
    assert all(c["waits_for"] == ["i22-ctx8k-AB"] and "--save-predictors" not in c["args"] for c in cells)


def test_unknown_names_stop_the_plan_naming_them():
    with pytest.raises(SystemExit, match="no-such-setting"):
        sweep_lanes.plan_lanes(SETTINGS, ["i22-ctx2k-A,no-such-setting"], [], STATES)
    with pytest.raises(SystemExit, match="RULER block"):
        sweep_lanes.plan_lanes(SETTINGS, [], ["i22-ctx2k-A"], STATES)


def test_ruler_cell_cuts_the_block_and_refuses_what_it_lacks():
    spec = {"tasks": ".ruler", "names": ["vt", "cwe"], "limits": {"sea": 30, "oracle": 15}}
    assert quality_sweep.ruler_cell(spec, "cwe", "oracle") == {"tasks": ".ruler", "names": ["cwe"],
                                                              "limits": {"oracle": 15}}
    assert quality_sweep.ruler_cell(spec, None, None) == spec
    with pytest.raises(SystemExit, match="fwe"):
        quality_sweep.ruler_cell(spec, "fwe", None)
    with pytest.raises(SystemExit, match="dense"):
        quality_sweep.ruler_cell(spec, None, "dense")


def _part(name, mode, task, score, seconds, **extra):
    return {"device": "NVIDIA H200", "rows": [{"name": name, **extra, "ruler": {mode: {
        "scores": {task: {"2048": score}}, "samples": {task: 10}, "seconds": seconds}}}]}


def test_merge_joins_ruler_cells_of_one_setting_into_one_row():
    parts = [{"device": "NVIDIA H200", "rows": [{"name": "i22-ctx2k-A", "main": {"sea_ratio": 1.1}}]},
             _part("r", "sea", "sea_ruler_vt", 0.5, 40.0, main={"sea_ratio": 1.03}),
             _part("r", "sea", "sea_ruler_cwe", 0.25, 55.0, main={"sea_ratio": 1.03}),
             _part("r", "oracle", "sea_ruler_vt", 1.0, 90.0, main={"sea_ratio": 1.03})]
    merged = sweep_lanes.merge(parts)
    assert [r["name"] for r in merged["rows"]] == ["i22-ctx2k-A", "r"]
    ruler = merged["rows"][1]["ruler"]
    assert ruler["sea"]["scores"] == {"sea_ruler_vt": {"2048": 0.5}, "sea_ruler_cwe": {"2048": 0.25}}
    assert ruler["sea"]["seconds"] == 55.0 and ruler["oracle"]["samples"] == {"sea_ruler_vt": 10}
    assert merged["device"] == "NVIDIA H200"
    assert "r" in sweep_lanes.table(merged) and "cwe 0.25" in sweep_lanes.table(merged)


def test_states_are_saved_whole_under_their_name(tmp_path):
    path = tmp_path / "s.pt"
    quality_sweep.save_atomic({"predictors": [{"w": torch.ones(3)}]}, path)
    assert torch.equal(torch.load(path)["predictors"][0]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # no temporary file left beside it


def test_report_tables_show_content_and_ruler_rows():
    import quality_report

    merged = sweep_lanes.merge([_part("r", "sea", "sea_ruler_vt", 0.5, 40.0),
                                _part("r", "dense", "sea_ruler_vt", 0.75, 40.0)])
    merged["rows"][0]["content"] = [{"keys": "bound", "weight": 0.5, "sea_ratio": 1.0312, "density": 0.228,
                                     "passkey": {"mean": 0.6}}]
    assert "| r | bound | 0.5 | 1.0312 | 0.228 | 0.600 |" in quality_report.content_table(merged["rows"])
    ruler = quality_report.ruler_table(merged["rows"])
    assert "| r | vt | sea | 2048: 0.50 | 10 |" in ruler and "| r | vt | dense | 2048: 0.75 | 10 |" in ruler
    assert quality_report.content_table([{"name": "x"}]) == ""  # no content rows: no table


def test_an_earlier_calls_outputs_and_retrained_states_are_cleared(tmp_path):
    """A warm machine keeps /tmp between calls: lane folders go, and so do the states of settings a lane of this call
    trains again (their waiters must not start on the old ones); states only reused are kept."""
    states, work = tmp_path / "states", tmp_path / "lanes"
    states.mkdir()
    (work / "0").mkdir(parents=True)
    (work / "0" / "quality.json").write_text("{}")
    for name in ("i22-ctx2k-A", "i22-ctx8k-AB"):
        (states / f"{name}.pt").write_bytes(b"old")
    plan = sweep_lanes.plan_lanes(SETTINGS, ["i22-ctx2k-A", "i22-ctx2k-AB"], ["i22-ctx8k-AB-ruler-rest"], states)
    sweep_lanes.clear_stale(plan, states, work)
    assert not work.exists()
    assert sorted(p.name for p in states.iterdir()) == ["i22-ctx8k-AB.pt"]  # reused by the RULER cells, kept


def test_the_dense_control_measures_stage_bs_adapters_and_only_them():
    """After stage B the sweep reports dense attention with the adapters on, so a lever that lowers SEA's perplexity
    by moving the model itself (toward the training text) shows there too."""
    from conftest import tiny_model
    from sea_convert.evaluate import mode_perplexity
    from sea_convert.integration import attach_sea
    from sea_convert.lora import apply_lora
    from sea_convert.recipe import SEAConfig

    import quality_report

    model = tiny_model("llama")
    attach_sea(model, SEAConfig(k=8, predictor_length=16, nbf=2))
    windows = torch.randint(0, 128, (2, 48))
    teacher, _ = mode_perplexity(model, windows, "dense")
    assert quality_sweep.adapted_dense(model, windows, teacher) is None  # no stage B, no control
    layers = apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    same = quality_sweep.adapted_dense(model, windows, teacher)
    assert same["ppl"] == pytest.approx(teacher, rel=1e-6) and same["ratio"] == pytest.approx(1.0, rel=1e-6)  # B = 0
    for layer in layers:
        torch.nn.init.normal_(layer.lora_b, std=0.5)
    moved = quality_sweep.adapted_dense(model, windows, teacher)
    assert abs(moved["ratio"] - 1.0) > 1e-3 and moved["ppl"] == pytest.approx(moved["ratio"] * teacher)
    row = {"name": "x", "ctx": 48, "mode": "block", "stages": {"b": {"steps": 3}}, "teacher_ppl": teacher,
           "gpu_minutes_total": 0.1, "main": {"block_keys": 16, "sea_ppl": 2.0, "sea_ratio": 1.05, "density": 0.5},
           "dense_adapted": moved}
    table = quality_report.table([row, {**row, "name": "y", "dense_adapted": None}])
    assert "dense + stage-B adapters" in table and f"(x{moved['ratio']:.4f})" in table
    assert "| 0.500 | - |" in table  # a row without the control
    assert "dense + stage-B adapters" not in quality_report.table([{k: v for k, v in row.items() if k != "dense_adapted"}])
