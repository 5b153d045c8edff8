"""One conversion job as three stages that hand over through files: distill -> validate -> publish.

Each stage is a plain function of (recipe, paths) that the local `run` calls in turn and the Ray
job runs as a task with the recipe's resources. A stage finishes by writing its result file last,
so a retried or re-queued stage finds the earlier attempt's finished work and does not redo it.
The work folder belongs to one run (its `owner`): another run's leftovers are wiped, never reused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from sea_convert import checkpoint
from safetensors.torch import load_file

from sea_convert.checkpoint import PREDICTORS_FILE, CheckpointError, load_predictor_state, save_converted
from sea_convert.data import build_splits
from sea_convert.evaluate import attention_picture
from sea_convert.integration import attach_sea, compile_predictors
from sea_convert.lora import merge_lora
from sea_convert.models import DTYPES, load_teacher, pick_device, source_location
from sea_convert.provenance import data_provenance, model_provenance
from sea_convert.recipe import Recipe, check_fits_model
from sea_convert.train_state import make_state_dir
from workers.pipeline.distill import clear_state, distill_stage
from workers.pipeline.job_paths import JobPaths, remove_work, work_owner
from workers.train.loop import DistillResult
from workers.train.sharded_load import build_skeleton
from workers.pipeline.publish import publish_stage
from workers.pipeline.run_estimate import RunEstimate, fmt_duration, time_modes
from workers.pipeline.storage import build_manifest, publish
from workers.train.train_launch import launch_training
from workers.pipeline.validate import ValidationReport, teacher_reference, validate_stage

Log = Callable[[str], None]


class GateFailure(RuntimeError):
    def __init__(self, report: dict, failures: list[str]):
        super().__init__("validation gates failed: " + "; ".join(failures))
        self.report = report

    def __reduce__(self):  # crosses process boundaries (Ray) with its report
        return (GateFailure, (self.report, self.report.get("gate_failures", [])))


@dataclass
class PipelineResult:
    checkpoint: Path
    report: dict
    seconds: float


def model_card(recipe: Recipe, report: dict) -> str:
    ppl, mmlu, d = report["perplexity"], report.get("mmlu"), report["distill"]
    lines = [
        f"# {recipe.name}: {recipe.model.describe()} converted to SEA attention",
        "",
        "SEA (Sparse linear attention with an Estimated Attention mask, ICLR 2024), converted by sea-convert.",
        "Load with `sea_convert.checkpoint.load(path)`.",
        "",
        f"SEA settings: mode `{recipe.sea.mode}`, k={recipe.sea.k}, K={recipe.sea.predictor_length}, "
        f"nbf={recipe.sea.nbf}, block size {recipe.sea.block_size}, predictor rows `{recipe.sea.predictor_rows}`.",
        "",
        "| held-out perplexity | value |",
        "|---|---|",
        f"| teacher (dense) | {ppl['teacher_ppl']:.3f} |",
        f"| SEA | {ppl['sea_ppl']:.3f} |",
        f"| ratio | {ppl['ppl_ratio']:.4f} |",
        f"| attention density used | {ppl['density']:.3f} |",
        f"| context / windows / tokens | {ppl['ctx']} / {ppl['windows']} / {ppl['tokens']} |",
        "",
        f"Held-out text: {ppl['held_out_source']} (its last {ppl['held_out_tokens']} tokens).",
        "",
    ]
    if mmlu:
        lines += [
            f"MMLU ({mmlu['shots']}-shot, {mmlu['questions']} questions): teacher {mmlu['teacher_accuracy']:.4f},"
            f" SEA {mmlu['sea_accuracy']:.4f}.",
            "",
        ]
    for stage in ("a", "b"):
        st = d.get(f"stage_{stage}")
        if st:
            lines += [f"Distillation stage {stage.upper()}: {st['steps']} steps, {d['seconds_by_stage'].get(stage, 0)} s; "
                      f"loss {st['loss_first']:.4f} -> {st['loss_last']:.4f}.", ""]
    if recipe.distill.stage_b is not None and recipe.distill.stage_b.train_base != "none":
        lines += [f"Stage B fine-tuned the base weights ({recipe.distill.stage_b.train_base}); the teacher numbers"
                  " above are the original model's.", ""]
    lines += [
        f"Distillation total: {d['steps']} steps, {d['tokens']} tokens, {d['seconds']} s.",
        "",
        "![teacher attention, SEA estimate and chosen mask](attention.png)",
        "",
    ]
    return "\n".join(lines)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a reader sees the whole file or none


def _owner_of_checkpoint(path: Path) -> str | None:
    try:
        return json.loads((path / "report.json").read_text()).get("run", {}).get("owner")
    except (OSError, ValueError, AttributeError):
        return None


def check_destination(recipe: Recipe, paths: JobPaths, owner: str) -> None:
    """Fail before any work if the destination exists and may not be replaced (a folder this same
    run already wrote, before a restart cut it short, is its own and may be)."""
    if paths.destination.exists() and not recipe.output.overwrite and _owner_of_checkpoint(paths.destination) != owner:
        raise CheckpointError(f"output folder {paths.destination} already exists (set output.overwrite or pass another --output)")


def claim_work_dir(paths: JobPaths, owner: str) -> None:
    """Keep this run's own work (a retried stage, a re-queued job); wipe an earlier run's (its owner.json
    says sea-convert made it). A folder of that name that sea-convert did not make is never touched."""
    found = work_owner(paths.work)
    if found == owner:
        return
    if found is None and paths.work.exists():
        raise CheckpointError(f"work folder {paths.work} exists and was not made by sea-convert: move it away or"
                              " choose another output folder")
    shutil.rmtree(paths.work, ignore_errors=True)
    paths.work.mkdir(parents=True)
    _write_json(paths.work / "owner.json", {"owner": owner, "started": time.time()})
    make_state_dir(paths.state)  # marked as ours, so cleanup may remove it (a folder that existed stays)


def _done(path: Path, log: Log, stage: str) -> dict | None:
    if path.is_file():
        log(f"{stage}: finished by an earlier attempt of this run ({path.name})")
        return json.loads(path.read_text())
    return None


Progress = Callable[[str, int, int], None]  # (stage, step, total steps)


def stage_distill(recipe: Recipe, paths: JobPaths, progress: bool = False, log: Log = print,
                  log_every: int | None = None, on_progress: Progress | None = None) -> dict:
    """Teacher reference numbers, then stage A (+ B); the trained model goes to work/model.
    `log_every`: also log one line per that many steps (for logs followed from afar; no bars there).
    `on_progress(stage, step, total)` after every step (the service records it on the job)."""
    done = _done(paths.work / "distill.json", log, "distill")
    if done is not None:
        return done
    if recipe.distill.parallel.launched:
        model, tokenizer, reference, distilled = _distill_parallel(recipe, paths, log)
    else:
        model, tokenizer, reference, distilled = _distill_here(recipe, paths, progress, log, log_every, on_progress)
    if distilled.resumed_from:
        log(f"resumed at stage {distilled.resumed_from['stage'].upper()} step {distilled.resumed_from['step']}")
    log(f"distilled {distilled.steps} steps in {distilled.seconds:.0f} s")
    merged = merge_lora(model)  # a plain transformers checkpoint: adapters folded into the base weights
    if merged:
        log(f"merged {merged} LoRA adapters into the base weights")
    save_converted(model, tokenizer, recipe.sea, recipe.model, paths.work / "model", overwrite=True,
                   base_finetuned=_base_finetuned(recipe), save_base_weights=reference is not None)
    result = {"reference": reference, "distill": distilled.summary(), "distill_history": distilled.history,
              "provenance": {"model": model_provenance(recipe.model, model.config), "data": data_provenance(recipe.data)}}
    _write_json(paths.work / "distill.json", result)
    return result


def _distill_here(recipe: Recipe, paths: JobPaths, progress: bool, log: Log, log_every: int | None,
                  on_progress: Progress | None):
    """One process: teacher reference numbers first (stage B may move the base), then stage A (+ B)."""
    torch.manual_seed(recipe.distill.seed)
    device = pick_device(recipe.distill.device)
    estimate = RunEstimate.for_recipe(recipe)
    log(f"loading {recipe.model.describe()} on {device}")
    model, tokenizer = load_teacher(recipe.model, device)
    estimate.load_s = estimate.elapsed()
    check_fits_model(recipe, model.config)
    attach_sea(model, recipe.sea)
    if recipe.sea.compile and device.type == "cuda":
        compile_predictors(model)
    log(f"data: train {recipe.data.train.describe()}")
    splits = build_splits(recipe.data, tokenizer)
    log(f"training windows {tuple(splits.train.shape)}, held-out tokens {splits.held_out.numel()} ({splits.held_out_source})")
    t0 = time.monotonic()
    reference = teacher_reference(recipe, model, tokenizer, splits, progress=progress)
    estimate.teacher_eval_s = time.monotonic() - t0
    estimate.sea_over_dense = time_modes(model, recipe, splits)
    log(f"teacher perplexity {reference['teacher_ppl']:.3f} (evaluated in {estimate.teacher_eval_s:.0f} s;"
        f" SEA attention costs {estimate.sea_over_dense:.1f}x dense on one window)")

    seen: dict[str, int] = {}  # steps run by this process, per stage (a resumed run starts past step 1)

    def on_step(stage: str, m) -> None:
        cfg = recipe.distill.stage_a if stage == "a" else recipe.distill.stage_b
        if on_progress is not None:
            on_progress(f"distill {stage.upper()}", m.step, cfg.steps)
        seen[stage] = seen.get(stage, 0) + 1
        if seen[stage] == 2 or (seen[stage] == 1 and m.step == cfg.steps):  # step 1 pays one-time costs: time step 2
            estimate.step_s[stage] = m.seconds
            log(f"stage {stage.upper()}: {cfg.steps} steps at {m.seconds:.1f} s/step; {estimate.line(stage, m.step)}")
        if log_every and m.step % log_every == 0:
            log(f"stage {stage.upper()} step {m.step}: loss {m.loss:.4f}, density {m.density:.3f}, {m.seconds:.2f} s/step")

    distilled = distill_stage(recipe, model, splits, on_step=on_step, progress=progress, state_dir=paths.state)
    log(f"distillation done; {estimate.line('distill')}")
    reference["validate_estimate_s"] = estimate.after_distill()  # for the validate stage's first line
    return model, tokenizer, reference, distilled


def _distill_parallel(recipe: Recipe, paths: JobPaths, log: Log):
    """Stage A on N workers (Ray Train or torchrun). This process never holds the teacher's weights:
    work/model gets the predictors and a pointer to the base (the validate stage loads it from its
    source, and measures the teacher's reference numbers there, stage A having left it unchanged)."""
    result = launch_training(recipe, paths.work / "parallel", paths.state, paths.work / "train-runs", log=log)
    where, kwargs = source_location(recipe.model)
    config = AutoConfig.from_pretrained(where, **kwargs)
    check_fits_model(recipe, config)
    model = build_skeleton(config, DTYPES[recipe.model.dtype])
    attach_sea(model, recipe.sea, device="cpu")
    load_predictor_state(model, load_file(str(paths.work / "parallel" / PREDICTORS_FILE)))
    tokenizer = AutoTokenizer.from_pretrained(where, config=config, **kwargs)  # as load_teacher: no second parse
    distilled = DistillResult(**{f.name: result[f.name] for f in fields(DistillResult)})
    return model, tokenizer, None, distilled


def _base_finetuned(recipe: Recipe) -> bool:
    return recipe.distill.stage_b is not None and recipe.distill.stage_b.train_base != "none"


def stage_validate(recipe: Recipe, paths: JobPaths, progress: bool = False, log: Log = print) -> dict:
    """SEA's perplexity and MMLU on the trained model, the gates, and the attention picture."""
    done = _done(paths.work / "validate.json", log, "validate")
    if done is not None:
        return done
    distilled = json.loads((paths.work / "distill.json").read_text())
    guess = (distilled["reference"] or {}).get("validate_estimate_s")
    log("validate: SEA perplexity" + (" and MMLU" if recipe.validate_.mmlu.enabled else "") + " on the trained model"
        + (f", about {fmt_duration(guess)} with publishing" if guess else ""))
    model, tokenizer = checkpoint.load(paths.work / "model", pick_device(recipe.distill.device))
    splits = build_splits(recipe.data, tokenizer)
    if distilled["reference"] is None:  # a parallel stage A: the base is the unchanged teacher
        distilled["reference"] = teacher_reference(recipe, model, tokenizer, splits, progress=progress)
        log(f"teacher perplexity {distilled['reference']['teacher_ppl']:.3f}")
    validation: ValidationReport = validate_stage(recipe, model, tokenizer, splits, distilled["reference"], progress=progress)
    if recipe.validate_.picture:
        attention_picture(model, splits.held_out[:256], paths.work / "attention.png")
    report = {"recipe": recipe.model_dump(mode="json", by_alias=True), "distill": distilled["distill"],
              "distill_history": distilled["distill_history"], "provenance": distilled["provenance"], **validation.as_dict()}
    p = report["perplexity"]
    log(f"SEA perplexity {p['sea_ppl']:.3f} (x{p['ppl_ratio']:.4f} the teacher), density {p['density']:.3f}"
        + ("" if validation.passed else "; gates failed: " + "; ".join(validation.gate_failures)))
    _write_json(paths.work / "validate.json", report)
    return report


def stage_publish(recipe: Recipe, paths: JobPaths, owner: str, log: Log = print) -> dict:
    """Only a run that passed its gates gets here with something to write: the checkpoint folder
    (atomically), then the dated version at output.publish_uri. Clears the run's work and state."""
    report = json.loads((paths.work / "validate.json").read_text())
    if not report["gates_passed"]:
        raise GateFailure(report, report["gate_failures"])
    started = json.loads((paths.work / "owner.json").read_text())["started"]
    report["run"] = {"owner": owner}
    report["seconds_total"] = round(time.time() - started, 1)
    model, tokenizer = checkpoint.load(paths.work / "model")
    extra = {"attention.png": paths.work / "attention.png"} if (paths.work / "attention.png").is_file() else {}
    own = _owner_of_checkpoint(paths.destination) == owner  # a publish this run began before a restart
    path = publish_stage(recipe, model, tokenizer, report, model_card(recipe, report), paths.destination, extra,
                         overwrite=recipe.output.overwrite or own, base_finetuned=_base_finetuned(recipe))
    log(f"checkpoint written to {path}")
    out = {"checkpoint": str(path), "published": None, "manifest": build_manifest(path)}
    if recipe.output.publish_uri:
        pub = publish(path, recipe.output.publish_uri, promote=True, storage_options=recipe.output.storage_options,
                      manifest=out["manifest"])  # hashed once, above
        out["published"] = asdict(pub)
        log(f"published {pub.uri}" + (" (same content as before: nothing uploaded)" if pub.reused else "")
            + ("; latest -> this version" if pub.promoted else ""))
    clear_state(recipe, paths.state)
    remove_work(paths.work, owner)
    return out


def run_pipeline(recipe: Recipe, output_dir: Path | None = None, progress: bool = False, log: Log = print,
                 owner: str | None = None) -> PipelineResult:
    """The three stages in this process, one after the other (the local `sea-convert run`)."""
    t0 = time.perf_counter()
    paths = JobPaths.for_recipe(recipe, output_dir)
    owner = owner or uuid.uuid4().hex
    check_destination(recipe, paths, owner)  # fail before any work, not after
    claim_work_dir(paths, owner)
    stage_distill(recipe, paths, progress=progress, log=log)
    stage_validate(recipe, paths, progress=progress, log=log)
    out = stage_publish(recipe, paths, owner, log=log)
    report = json.loads((Path(out["checkpoint"]) / "report.json").read_text())
    if out["published"]:
        report["published"] = out["published"]
    return PipelineResult(Path(out["checkpoint"]), report, time.perf_counter() - t0)
