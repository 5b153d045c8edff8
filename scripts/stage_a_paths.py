"""Stage A's first steps by the two ways a recipe is trained, each in a fresh process, and two ways between them.

Issue 24 found, on an H100, that `sea-convert run` and the service's Ray Train worker each repeat their own loss
history bit for bit, run after run, but sit 8.2e-4 apart after 120 steps (6.2e-7 at step 1); on the CPU the two
agree bit for bit. The paths, in the order they move from one to the other:

  worker             the service's worker body (workers.train.train_worker, one process, no process group): the
                     teacher loaded on the CPU, the predictors attached there, the model moved to the device
  teacher-on-device  the same, the teacher loaded straight onto the device, as `sea-convert run` loads it
  after-reference    that, then the teacher's perplexity and the SEA timing probe, before training
  run                `sea-convert run`'s distill stage itself (workers.pipeline.stages._distill_here)

The first path whose losses leave the worker's says which difference changes the GPU's rounding. Prints a table,
writes JSON; `--expect-equal` exits 1 unless every path equals the worker's bit for bit (the CPU test).

    python scripts/stage_a_paths.py --recipe recipes/smollm2-135m-gpu.yaml --steps 8 --json $OUT/stage_a_paths.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loss_histories import history_gaps
from recipe_overrides import set_field

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project, when run as a script from anywhere

PATHS = ("worker", "teacher-on-device", "after-reference", "run")


def _on_device(recipe, reference: bool) -> list[dict]:
    import torch

    from sea_convert.data import build_splits
    from sea_convert.integration import attach_sea
    from sea_convert.models import load_teacher, pick_device
    from workers.pipeline.run_estimate import time_modes
    from workers.pipeline.validate import teacher_reference
    from workers.train.loop import train_stages

    device = pick_device(recipe.distill.device)
    torch.manual_seed(recipe.distill.seed)
    model, tokenizer = load_teacher(recipe.model, device)
    attach_sea(model, recipe.sea)
    splits = build_splits(recipe.data, tokenizer)
    if reference:
        teacher_reference(recipe, model, tokenizer, splits)
        time_modes(model, recipe, splits)
    probe = splits.held_out[: recipe.data.seq_len].unsqueeze(0).to(device)
    return train_stages(recipe, model, splits.train, probe, device, only=("a",)).history


def train_one_path(path: str, recipe_text: str, work: Path) -> list[dict]:
    """The stage-A history of one path, in this process (a child of main)."""
    from sea_convert.recipe_json import load_recipe_json

    recipe = load_recipe_json(recipe_text, source="stage_a_paths recipe")
    if path == "worker":
        from workers.train.train_worker import WorkerConfig, train_worker

        return train_worker(WorkerConfig(recipe=recipe_text, out_dir=str(work / "worker")).model_dump())["history"]
    if path == "run":
        from workers.pipeline.job_paths import JobPaths
        from workers.pipeline.stages import _distill_here

        paths = JobPaths(work / "run", work / "run.work", work / "run.state")
        return _distill_here(recipe, paths, False, lambda msg: None, None, None)[3].history
    return _on_device(recipe, reference=path == "after-reference")


def recipe_for_paths(recipe_file: Path, sets: list[str], steps: int, work: Path) -> str:
    """The recipe's stage A alone, `steps` long, trained from scratch in one process, as validated JSON."""
    from sea_convert.recipe import parse_recipe, read_recipe_file
    from sea_convert.recipe_json import recipe_json

    data = read_recipe_file(recipe_file)
    for item in sets:
        set_field(data, item)
    distill = data.setdefault("distill", {})
    distill.pop("stage_b", None)
    distill.pop("parallel", None)
    distill["resume"] = False
    distill.setdefault("stage_a", {})["steps"] = steps
    data["output"] = {"dir": str(work / "output")}
    return recipe_json(parse_recipe(data, base_dir=recipe_file.resolve().parent, source=str(recipe_file)))


def run_path(path: str, work: Path) -> dict:
    """One path in a fresh process: no path inherits another's GPU state."""
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, __file__, "--child", path, "--child-io", str(work)], cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"the {path} path failed (exit {res.returncode})")
    losses = [h["loss"] for h in json.loads((work / f"{path}.json").read_text())]
    return {"losses": losses, "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-135m-gpu.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe field (dotted; YAML value)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"a comma-separated subset of {', '.join(PATHS)}")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--expect-equal", action="store_true", help="exit 1 unless every path equals the worker's")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--child-io", type=Path, help=argparse.SUPPRESS)  # folder: recipe.json in, <path>.json out
    args = ap.parse_args()
    if args.child:
        history = train_one_path(args.child, (args.child_io / "recipe.json").read_text(), args.child_io)
        (args.child_io / f"{args.child}.json").write_text(json.dumps(history))
        return 0

    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        ap.error(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(PATHS)})")
    work = Path(tempfile.mkdtemp(prefix="stage-a-paths-"))
    try:
        (work / "recipe.json").write_text(recipe_for_paths(args.recipe, args.set, args.steps, work))
        runs = {path: run_path(path, work) for path in paths}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = runs[paths[0]]["losses"]
    print(f"stage A, {args.steps} steps of {args.recipe.name}, each path in a fresh process; gaps against {paths[0]}")
    print(f"{'path':<18} {'step-1 loss':<22} {'max rel. gap':>12} {'first differing step':>21} {'wall s':>7}")
    for path, run in runs.items():
        gaps = history_gaps([{"loss": x} for x in run["losses"]], [{"loss": x} for x in base])["all"]
        first = gaps["first_differing_step"]
        run.update(max_rel_gap=gaps["max"], first_differing_step=first)
        print(f"{path:<18} {run['losses'][0]!r:<22} {run['max_rel_gap']:>12.2e} {str(first or '-'):>21} {run['seconds']:>7}")
    if args.json:
        import torch

        args.json.parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        args.json.write_text(json.dumps({"recipe": str(args.recipe), "sets": args.set, "steps": args.steps,
                                         "device": device, "torch": torch.__version__, "paths": runs}, indent=1) + "\n")
    equal = all(run["max_rel_gap"] == 0.0 for run in runs.values())
    print("RESULT:", "every path equals the first bit for bit" if equal else "the paths differ")
    return 0 if equal or not args.expect_equal else 1


if __name__ == "__main__":
    sys.exit(main())
