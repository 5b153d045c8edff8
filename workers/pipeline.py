"""One conversion job: load -> distill -> validate -> publish. A plain function; the Ray job calls it later."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sea_convert.checkpoint import prepare_output_dir
from sea_convert.data import build_splits
from sea_convert.evaluate import attention_picture
from sea_convert.integration import attach_sea, compile_predictors
from sea_convert.lora import merge_lora
from sea_convert.models import load_teacher, pick_device
from sea_convert.recipe import Recipe
from workers.distill import DistillResult, clear_state, default_state_dir, distill_stage
from workers.publish import publish_stage
from workers.storage import publish
from workers.validate import ValidationReport, teacher_reference, validate_stage


class GateFailure(RuntimeError):
    def __init__(self, report: dict, failures: list[str]):
        super().__init__("validation gates failed: " + "; ".join(failures))
        self.report = report


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
        f"nbf={recipe.sea.nbf}, block size {recipe.sea.block_size}.",
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


def run_pipeline(recipe: Recipe, output_dir: Path | None = None, progress: bool = False, log=print) -> PipelineResult:
    t0 = time.perf_counter()
    destination = Path(output_dir) if output_dir is not None else recipe.output.dir
    prepare_output_dir(destination, recipe.output.overwrite)  # fail before any work, not after
    state_dir = default_state_dir(recipe, destination)
    torch.manual_seed(recipe.distill.seed)
    device = pick_device(recipe.distill.device)
    log(f"loading {recipe.model.describe()} on {device}")
    model, tokenizer = load_teacher(recipe.model, device)
    attach_sea(model, recipe.sea)
    if recipe.sea.compile and device.type == "cuda":
        compile_predictors(model)
    log(f"data: train {recipe.data.train.describe()}")
    splits = build_splits(recipe.data, tokenizer)
    log(f"training windows {tuple(splits.train.shape)}, held-out tokens {splits.held_out.numel()} ({splits.held_out_source})")
    reference = teacher_reference(recipe, model, tokenizer, splits, progress=progress)  # before stage B moves the base
    log(f"teacher perplexity {reference['teacher_ppl']:.3f}")
    distilled: DistillResult = distill_stage(recipe, model, splits, progress=progress, state_dir=state_dir)
    if distilled.resumed_from:
        log(f"resumed from {state_dir} at stage {distilled.resumed_from['stage'].upper()} step {distilled.resumed_from['step']}")
    log(f"distilled {distilled.steps} steps in {distilled.seconds:.0f} s")
    validation: ValidationReport = validate_stage(recipe, model, tokenizer, splits, reference, progress=progress)
    report = {
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "distill": distilled.summary(),
        "distill_history": distilled.history,
        **validation.as_dict(),
    }
    if not validation.passed:
        raise GateFailure(report, validation.gate_failures)
    merged = merge_lora(model)  # a plain transformers checkpoint: adapters folded into the base weights
    if merged:
        log(f"merged {merged} LoRA adapters into the base weights")
    with tempfile.TemporaryDirectory() as tmp:
        extra = {}
        if recipe.validate_.picture:
            extra["attention.png"] = attention_picture(model, splits.held_out[:256], Path(tmp) / "attention.png")
        report["seconds_total"] = round(time.perf_counter() - t0, 1)
        path = publish_stage(recipe, model, tokenizer, report, model_card(recipe, report), destination, extra)
    if recipe.output.publish_uri:
        pub = publish(path, recipe.output.publish_uri, promote=True, storage_options=recipe.output.storage_options)
        report["published"] = asdict(pub)
        log(f"published {pub.uri}" + (" (same content as before: nothing uploaded)" if pub.reused else "")
            + ("; latest -> this version" if pub.promoted else ""))
    clear_state(state_dir)
    return PipelineResult(path, report, time.perf_counter() - t0)
