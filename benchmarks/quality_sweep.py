"""The quality sweep behind docs/quality.md: several conversion settings of one model, one process.

    python benchmarks/quality_sweep.py --settings benchmarks/quality_settings.yaml --out OUT [--only a,b]

The settings file names a base recipe and a list of settings, each a set of recipe overrides.
For every setting it prints and writes (JSON, after each setting, so a cut-off run keeps what
it finished): held-out perplexity of the teacher, the oracle (true top blocks at the same budget)
and SEA, the density SEA used, and the GPU-seconds of each training stage. Optional per setting:
  reuse: NAME       start from NAME's trained predictors instead of training stage A
  reuse_adapters: true   also NAME's stage-B LoRA adapters (e.g. to evaluate it again, with MMLU)
  curve: [..]       also evaluate SEA and the oracle at these block_keys budgets (block mode)
  mmlu: true        MMLU of the teacher and of SEA after this setting (the base recipe's mmlu block)
  passkey: {lengths, depths, per_cell}   the pass-key grid, teacher / SEA / oracle
  ruler: {tasks: FOLDER, limits: {dense: N, sea: N, oracle: N}}   RULER's offline tasks through the harness,
                    from task files written beforehand (sea_convert.harness.write_ruler_samples), N per task
  content: {weights: [..], keys: [mean, bound], passkey: {..}}   SEA again with a content term in its block
                    selection (benchmarks/content_term_probe.content_term, a probe around the method, prefill only):
                    perplexity and, with a passkey grid, the pass key, per (keys, weight)
  budget_s: {a: S, b: S}  cap a stage's wall time: after 3 steps the run is re-planned to fit
The model is loaded once; between settings its base weights are restored and adapters removed.
Several processes can share one GPU (benchmarks/sweep_lanes.py): --ruler-task/--ruler-mode give one of them
one (task, mode) cell of a setting's RULER block, and states are saved whole or not at all, so a process
waiting on another's `reuse` never reads half a file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sea_convert.data import build_splits, eval_windows  # noqa: E402
from sea_convert.evaluate import mode_perplexity  # noqa: E402
from sea_convert.integration import attach_sea, compile_predictors, predictors, set_sea_config  # noqa: E402
from sea_convert.lora import adapters_off, apply_lora, lora_layers, remove_lora  # noqa: E402
from sea_convert.models import load_teacher, pick_device  # noqa: E402
from sea_convert.passkey import make_grid, passkey_accuracy  # noqa: E402
from sea_convert.recipe import RecipeError, load_recipe, parse_recipe  # noqa: E402
from workers.pipeline.distill import distill_stage  # noqa: E402
from workers.pipeline.validate import mmlu_accuracy  # noqa: E402


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def check_settings(spec: dict, base_dict: dict, base_dir: Path) -> dict:
    """Every setting's recipe, parsed before any model loads (a bad override would otherwise stop a GPU run after
    the settings before it): {name: recipe}. A `reuse` must name a setting of the file."""
    names = [s["name"] for s in spec["settings"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"settings named twice: {sorted({n for n in names if names.count(n) > 1})}")
    recipes = {}
    for setting in spec["settings"]:
        if setting.get("reuse") is not None and setting["reuse"] not in names:
            raise SystemExit(f"setting {setting['name']}: reuse names no setting of the file: {setting['reuse']!r}")
        try:
            recipes[setting["name"]] = parse_recipe(deep_merge(base_dict, setting.get("overrides", {})),
                                                    base_dir=base_dir, source=f"setting {setting['name']}")
        except RecipeError as err:
            raise SystemExit(str(err)) from None
    return recipes


PROGRESS_EVERY = 25  # steps between progress lines: a lane stopped at its deadline shows how far it got


class Budget:
    """Re-plans a stage's step count from its measured step time (steps 2-3; step 1 pays warm-up), and prints
    the stage's progress."""

    def __init__(self, seconds: float | None):
        self.seconds, self.trainer, self.t_start = seconds, None, None
        self.t0 = time.perf_counter()

    def on_trainer(self, stage, trainer):
        self.trainer = trainer

    def on_step(self, stage, m):
        if m.step % PROGRESS_EVERY == 0:
            print(f"  stage {stage.upper()}: step {m.step}/{self.trainer.total_steps}, {time.perf_counter() - self.t0:.0f} s",
                  flush=True)
        if self.seconds is None:
            return
        if m.step == 1:
            self.t_start, self.first = time.perf_counter(), m.seconds
        elif m.step == 3:
            per_step = (time.perf_counter() - self.t_start) / 2
            fit = 3 + math.floor((self.seconds - self.first - 2 * per_step) / per_step)
            if fit < self.trainer.total_steps:
                print(f"  stage {stage.upper()}: {per_step:.3f} s/step -> {fit} steps to fit {self.seconds:.0f} s", flush=True)
                self.trainer.set_total_steps(max(fit, 4))


def passkey_grid(tokenizer, recipe, spec: dict) -> list:
    """The pass-key prompts of a setting's grid spec {lengths, depths, per_cell[, seed]}."""
    return make_grid(tokenizer, spec["lengths"], spec["depths"], spec["per_cell"], spec.get("seed", 0),
                     add_bos=recipe.data.add_bos)


def ruler_task_names(spec: dict) -> list[str]:
    """The tasks of a setting's RULER block: its `names`, or every offline task."""
    from sea_convert.harness import RULER_OFFLINE

    return list(spec.get("names", RULER_OFFLINE))


def passkey_rows(model, tokenizer, recipe, spec: dict) -> dict:
    """The pass-key grid (sea_convert.passkey) in each mode: teacher and oracle on the base weights (stage B's
    adapters off), SEA as trained. spec: {lengths, depths, per_cell[, seed]}."""
    t = time.perf_counter()
    samples = passkey_grid(tokenizer, recipe, spec)
    with adapters_off(model):
        res = passkey_accuracy(model, samples, ("dense", "oracle"))
    res.update(passkey_accuracy(model, samples, ("sea",)))
    res["seconds"] = round(time.perf_counter() - t, 1)
    res["samples"] = len(samples)
    print("  passkey: " + ", ".join(f"{m} {res[m]['mean']:.3f}" for m in ("dense", "sea", "oracle"))
          + f" ({len(samples)} prompts, {res['seconds']} s)", flush=True)
    return res


def content_rows(model, tokenizer, recipe, windows, teacher_ppl: float, spec: dict) -> list[dict]:
    """SEA's perplexity (and pass key, if spec has a grid) with a content term mixed into its block selection, for
    each (keys, weight) of spec: is the needle the estimator's blindness to content, and what does reading it cost?"""
    from benchmarks.content_term_probe import content_term

    samples = passkey_grid(tokenizer, recipe, spec["passkey"]) if spec.get("passkey") else None
    rows = []
    for keys in spec.get("keys", ["mean"]):
        for weight in spec["weights"]:
            t = time.perf_counter()
            with content_term(weight, keys), torch.no_grad():
                ppl, density = mode_perplexity(model, windows, "sea")
                acc = passkey_accuracy(model, samples, ("sea",))["sea"] if samples else None
            rows.append({"keys": keys, "weight": weight, "sea_ppl": ppl, "sea_ratio": ppl / teacher_ppl,
                         "density": density, "passkey": acc, "seconds": round(time.perf_counter() - t, 1)})
            print(f"  content {keys} w={weight}: SEA {ppl:.3f} (x{ppl / teacher_ppl:.4f}) density {density:.3f}"
                  + (f", pass key {acc['mean']:.3f}" if acc else "") + f" ({rows[-1]['seconds']} s)", flush=True)
    return rows


def ruler_rows(model, tokenizer, spec: dict, device) -> dict:
    """RULER's offline tasks through the harness ("sea" model type) from task files written beforehand
    (`sea_convert.harness.write_ruler_samples`): spec {tasks: folder, limits: {mode: documents per task}}.
    Teacher and oracle run on the base weights (stage B's adapters off)."""
    from sea_convert.harness import evaluate, ruler_scores

    folder = ROOT / spec["tasks"]
    names = [f"sea_ruler_{t}" for t in ruler_task_names(spec)]
    out: dict = {}
    for mode, limit in spec["limits"].items():
        t = time.perf_counter()
        with adapters_off(model) if mode != "sea" else contextlib.nullcontext():
            res = evaluate(model, names, attention=mode, tokenizer=tokenizer, limit=limit, include_path=folder,
                           device=str(device))
        out[mode] = {"scores": {n: ruler_scores(res, n) for n in names},
                     "samples": {n: res["n-samples"][n]["effective"] for n in names},
                     "seconds": round(time.perf_counter() - t, 1)}
        print(f"  RULER {mode} ({out[mode]['seconds']} s): " + "; ".join(
            f"{n.removeprefix('sea_ruler_')} " + "/".join(f"{v:.2f}" for _, v in sorted(out[mode]["scores"][n].items()))
            for n in names), flush=True)
    return out


def adapted_dense(model, windows, teacher_ppl: float) -> dict | None:
    """Dense attention with stage B's adapters on (None without adapters): what stage B did to the model itself,
    apart from SEA. A stage-B lever that lowers SEA's perplexity by moving the model toward the training text lowers
    this one as well; one that only makes the model work better with its sparse attention does not."""
    if not lora_layers(model):
        return None
    ppl, _ = mode_perplexity(model, windows, "dense")
    return {"ppl": ppl, "ratio": ppl / teacher_ppl}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


EXTRAS = {"passkey", "ruler", "mmlu", "content"}


def ruler_cell(spec: dict, task: str | None, mode: str | None) -> dict:
    """The setting's RULER block cut to one task and/or one mode (for one process of several)."""
    names = ruler_task_names(spec)
    if task is not None and task not in names:
        raise SystemExit(f"--ruler-task {task!r}: not a task of the setting's RULER block {names}")
    if mode is not None and mode not in spec["limits"]:
        raise SystemExit(f"--ruler-mode {mode!r}: not a mode of the setting's RULER block {sorted(spec['limits'])}")
    return {**spec, "names": [task] if task else names,
            "limits": {m: n for m, n in spec["limits"].items() if mode in (None, m)}}


def save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a reader sees the whole file or none."""
    part = path.with_name(f"{path.name}.{os.getpid()}.part")  # one per process: lanes may save the same name
    torch.save(state, part)
    part.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="folder for quality.json")
    ap.add_argument("--only", default=None, help="comma-separated setting names")
    ap.add_argument("--save-predictors", type=Path, default=None, help="folder to keep trained states (for --load-from)")
    ap.add_argument("--load-from", type=Path, default=None, help="folder of states saved by an earlier call")
    ap.add_argument("--device", default=None, help="override the recipe's distill.device (e.g. cpu for a dry run)")
    ap.add_argument("--skip", default="", help="comma-separated extras not to run: passkey, ruler, mmlu, content")
    ap.add_argument("--ruler-task", default=None, help="run only this task of a setting's RULER block")
    ap.add_argument("--ruler-mode", default=None, help="run only this mode (dense, sea, oracle) of its RULER block")
    args = ap.parse_args()
    skip = {x for x in args.skip.split(",") if x}
    if skip - EXTRAS:
        raise SystemExit(f"--skip: unknown extras {sorted(skip - EXTRAS)} (known: {sorted(EXTRAS)})")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on the GPU: the fp32 teacher at tensor-core speed

    spec = yaml.safe_load(args.settings.read_text())
    base_path = (args.settings.parent / spec["recipe"]).resolve()
    base_recipe = load_recipe(base_path)
    base_dict = base_recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    recipes = check_settings(spec, base_dict, base_path.parent)
    settings = spec["settings"]
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {s["name"] for s in settings}
        if unknown:
            raise SystemExit(f"unknown settings: {sorted(unknown)}")
        settings = [s for s in settings if s["name"] in wanted]

    device = pick_device(args.device or base_recipe.distill.device)
    t0 = time.perf_counter()
    model, tokenizer = load_teacher(base_recipe.model, device)
    print(f"loaded {base_recipe.model.describe()} on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "quality.json"
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "base_recipe": str(base_path.relative_to(ROOT)), "rows": []}
    trained: dict[str, dict] = {}  # setting -> predictor state (CPU), for `reuse`
    splits_cache: dict[str, object] = {}
    ref_cache: dict[tuple, tuple[float, float]] = {}

    def reference(mode: str, windows, sea_cfg) -> tuple[float, float]:
        """Teacher and oracle numbers depend only on the windows and the budget: measured once each."""
        key = (mode, windows.shape, sea_cfg.model_dump_json() if mode == "oracle" else "")
        if key not in ref_cache:
            if mode == "oracle":
                set_sea_config(model, sea_cfg)
            with adapters_off(model):
                ref_cache[key] = mode_perplexity(model, windows, mode)
        return ref_cache[key]

    for setting in settings:
        name = setting["name"]
        print(f"== {name}", flush=True)
        recipe = recipes[name]
        remove_lora(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in base_weights:
                    p.copy_(base_weights[n])
        attach_sea(model, recipe.sea)
        data_key = recipe.data.model_dump_json()
        if data_key not in splits_cache:
            splits_cache[data_key] = build_splits(recipe.data, tokenizer)
        splits = splits_cache[data_key]
        pcfg = recipe.validate_.perplexity
        windows = eval_windows(splits.held_out, pcfg.ctx, pcfg.max_windows)
        row = {"name": name, "note": setting.get("note", ""), "mode": recipe.sea.mode, "ctx": pcfg.ctx,
               "windows": int(windows.shape[0]), "sea": recipe.sea.model_dump(mode="json"), "stages": {}}
        only: tuple[str, ...] = ("a", "b")
        reuse = setting.get("reuse")
        if reuse is not None:
            source = trained.get(reuse)
            if source is None and args.load_from is not None and (args.load_from / f"{reuse}.pt").is_file():
                source = torch.load(args.load_from / f"{reuse}.pt")
            if source is None:
                raise SystemExit(f"{name}: reuse {reuse!r} has no trained predictors in this run or --load-from")
            for pred, sd in zip(predictors(model), source["predictors"], strict=True):
                pred.load_state_dict(sd)
            if source.get("lora") and setting.get("reuse_adapters"):  # the source's stage-B adapters too
                lc = source["lora"]
                apply_lora(model, lc["targets"], lc["rank"], lc["alpha"])
                named = dict(model.named_parameters())
                with torch.no_grad():
                    for n, t in lc["state"].items():
                        named[n].copy_(t)
            row["reused"] = reuse
            row["stages"].update(source["stages"])
            only = ("b",)
        if recipe.sea.compile and device.type == "cuda":
            compile_predictors(model)
        budgets = setting.get("budget_s", {})
        for stage in only:
            if stage == "b" and recipe.distill.stage_b is None:
                continue
            if stage == "a" and reuse is not None:
                continue
            budget = Budget(budgets.get(stage))
            sync()
            t = time.perf_counter()
            res = distill_stage(recipe, model, splits, on_step=budget.on_step, on_trainer=budget.on_trainer, only=(stage,))
            sync()
            hist = res.history
            row["stages"][stage] = {
                "steps": len(hist), "tokens": res.tokens, "train_seconds": round(res.seconds, 1),
                "wall_seconds": round(time.perf_counter() - t, 1), "gpu_minutes": round((time.perf_counter() - t) / 60, 2),
                "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"], "held_out": res.held_out,
            }
            print(f"  stage {stage.upper()}: {len(hist)} steps in {res.seconds:.0f} s, loss {hist[0]['loss']:.4f} -> "
                  f"{hist[-1]['loss']:.4f}", flush=True)
        trained[name] = {"predictors": [{k: v.detach().cpu().clone() for k, v in p.state_dict().items()}
                                        for p in predictors(model)], "stages": row["stages"]}
        b = recipe.distill.stage_b
        if lora_layers(model) and b is not None:
            trained[name]["lora"] = {"targets": b.lora_targets, "rank": b.lora_rank, "alpha": b.lora_alpha,
                                     "state": {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                                               if "lora_" in n}}
        if args.save_predictors is not None:
            args.save_predictors.mkdir(parents=True, exist_ok=True)
            save_atomic(trained[name], args.save_predictors / f"{name}.pt")

        t = time.perf_counter()
        teacher_ppl, _ = reference("dense", windows, recipe.sea)
        evals = []
        budgets_to_eval = [None] + [b for b in setting.get("curve", []) if b != recipe.sea.block_keys]
        for keys in budgets_to_eval:
            cfg = recipe.sea if keys is None else recipe.sea.model_copy(update={"block_keys": keys, "block_density": None})
            set_sea_config(model, cfg)
            sea_ppl, density = mode_perplexity(model, windows, "sea")
            e = {"block_keys": cfg.block_keys, "k": cfg.k, "sea_ppl": sea_ppl, "sea_ratio": sea_ppl / teacher_ppl,
                 "density": density}
            if cfg.mode == "block" or keys is None:
                o_ppl, o_density = reference("oracle", windows, cfg) if cfg.mode == "block" else (None, None)
                if o_ppl is not None:
                    e.update(oracle_ppl=o_ppl, oracle_ratio=o_ppl / teacher_ppl, oracle_density=o_density)
            evals.append(e)
            print(f"  budget {cfg.block_keys if cfg.mode == 'block' else 'k=' + str(cfg.k)}: SEA {sea_ppl:.3f} "
                  f"(x{sea_ppl / teacher_ppl:.4f}) density {density:.3f}"
                  + (f" | oracle {e['oracle_ppl']:.3f} (x{e['oracle_ratio']:.4f}) density {e['oracle_density']:.3f}"
                     if "oracle_ppl" in e else ""), flush=True)
        set_sea_config(model, recipe.sea)
        control = adapted_dense(model, windows, teacher_ppl)
        if control is not None:
            row["dense_adapted"] = control
            print(f"  dense with stage B's adapters: {control['ppl']:.3f} (x{control['ratio']:.4f})", flush=True)
        row.update(teacher_ppl=teacher_ppl, main=evals[0], curve=evals[1:],
                   eval_seconds=round(time.perf_counter() - t, 1))
        row["gpu_minutes_total"] = round(sum(s["gpu_minutes"] for s in row["stages"].values()), 2)
        print(f"  teacher {teacher_ppl:.3f}; GPU-minutes (training) {row['gpu_minutes_total']}", flush=True)

        if setting.get("passkey") and "passkey" not in skip:
            row["passkey"] = passkey_rows(model, tokenizer, recipe, setting["passkey"])
        if setting.get("content") and "content" not in skip:
            row["content"] = content_rows(model, tokenizer, recipe, windows, teacher_ppl, setting["content"])
        if setting.get("ruler") and "ruler" not in skip:
            row["ruler"] = ruler_rows(model, tokenizer, ruler_cell(setting["ruler"], args.ruler_task, args.ruler_mode),
                                      device)

        if setting.get("mmlu") and "mmlu" not in skip:
            m = recipe.validate_.mmlu
            t = time.perf_counter()
            with adapters_off(model):
                teacher_m = mmlu_accuracy(model, tokenizer, "dense", m.source, m.shots, m.limit, batch_size=m.batch_size)
            sea_m = mmlu_accuracy(model, tokenizer, "sea", m.source, m.shots, m.limit, batch_size=m.batch_size)
            row["mmlu"] = {"shots": m.shots, "questions": sea_m["questions"], "teacher_accuracy": teacher_m["accuracy"],
                           "sea_accuracy": sea_m["accuracy"], "seconds": round(time.perf_counter() - t, 1)}
            print(f"  MMLU {m.shots}-shot on {sea_m['questions']} questions: teacher {teacher_m['accuracy']:.4f}, "
                  f"SEA {sea_m['accuracy']:.4f} ({row['mmlu']['seconds']} s)", flush=True)
        results["rows"].append(row)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {results_path} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
