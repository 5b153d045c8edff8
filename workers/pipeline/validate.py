"""The validate stage: perplexity and MMLU of the teacher and of SEA on the same data, and the gates.

The teacher's numbers (and the oracle's, which uses the teacher's own attention) are measured
before distillation, since stage B may change the base weights: `teacher_reference` first,
`validate_stage` after training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sea_convert.data import Splits, eval_windows
from sea_convert.evaluate import mode_perplexity
from sea_convert.integration import attention_mode
from sea_convert.mmlu import load_mmlu, score_mmlu
from sea_convert.recipe import Recipe


@dataclass
class ValidationReport:
    perplexity: dict
    mmlu: dict | None
    gate_failures: list[str] = field(default_factory=list)
    harness: dict | None = None
    passkey: dict | None = None

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    def as_dict(self) -> dict:
        out = {"perplexity": self.perplexity, "mmlu": self.mmlu, "gates_passed": self.passed, "gate_failures": self.gate_failures}
        if self.harness is not None:
            out["harness"] = self.harness
        if self.passkey is not None:
            out["passkey"] = self.passkey
        return out


def harness_scores(recipe: Recipe, model, tokenizer, mode: str) -> dict | None:
    """{task: {metric: value}} of the recipe's lm-evaluation-harness tasks in one attention mode."""
    h = recipe.validate_.harness
    if not h.tasks:
        return None
    from sea_convert.harness import evaluate, headline

    device = str(next(model.parameters()).device)
    res = evaluate(model, list(h.tasks), attention=mode, tokenizer=tokenizer, limit=h.limit, num_fewshot=h.num_fewshot,
                   include_path=h.include_path, device=device)
    return {task: dict([headline(res, task)]) for task in h.tasks}


def passkey_scores(recipe: Recipe, model, tokenizer, mode: str) -> dict | None:
    """{"grid": {length: {depth: accuracy}}, "mean": ...} of validate.passkey in one attention mode (None: not asked)."""
    p = recipe.validate_.passkey
    if not p.lengths:
        return None
    from sea_convert.passkey import make_grid, passkey_accuracy

    samples = make_grid(tokenizer, p.lengths, p.depths, p.per_cell, p.seed, add_bos=recipe.data.add_bos)
    return passkey_accuracy(model, samples, (mode,))[mode]


def mmlu_accuracy(model, tokenizer, mode: str, source: str, shots: int, limit: int | None, progress: bool = False,
                  batch_size: int = 16) -> dict:
    with attention_mode(model, mode):
        res = score_mmlu(model, tokenizer, load_mmlu(source), shots=shots, limit=limit, batch_size=batch_size,
                         progress=progress)
    return {"accuracy": res.accuracy, "questions": res.n}


def mmlu_both(model, tokenizer, source: str, shots: int, limit: int | None, progress: bool = False) -> dict:
    """Teacher (dense) and SEA MMLU on one model whose base weights are the teacher's (the `mmlu` command)."""
    teacher = mmlu_accuracy(model, tokenizer, "dense", source, shots, limit, progress)
    sea = mmlu_accuracy(model, tokenizer, "sea", source, shots, limit, progress)
    return _mmlu_report(teacher, sea, source, shots, limit)


def _mmlu_report(teacher: dict, sea: dict, source: str, shots: int, limit: int | None) -> dict:
    return {"shots": shots, "limit": limit, "source": source, "questions": sea["questions"],
            "teacher_accuracy": teacher["accuracy"], "sea_accuracy": sea["accuracy"],
            "drop": teacher["accuracy"] - sea["accuracy"]}


def _windows(recipe: Recipe, splits: Splits):
    p = recipe.validate_.perplexity
    return eval_windows(splits.held_out, p.ctx, p.max_windows)


def teacher_reference(recipe: Recipe, model, tokenizer, splits: Splits, progress: bool = False) -> dict:
    """The teacher's perplexity and MMLU, and the oracle's perplexity, before any training."""
    v = recipe.validate_
    windows = _windows(recipe, splits)
    ref = {"teacher_ppl": mode_perplexity(model, windows, "dense", progress)[0]}
    if v.perplexity.oracle:
        ref["oracle_ppl"], ref["oracle_density"] = mode_perplexity(model, windows, "oracle", progress)
    if v.mmlu.enabled:
        ref["mmlu"] = mmlu_accuracy(model, tokenizer, "dense", v.mmlu.source, v.mmlu.shots, v.mmlu.limit, progress,
                                    v.mmlu.batch_size)
    if v.harness.tasks:
        ref["harness"] = harness_scores(recipe, model, tokenizer, "dense")
    if v.passkey.lengths:
        ref["passkey"] = passkey_scores(recipe, model, tokenizer, "dense")
        if v.perplexity.oracle:  # the oracle's retrieval at SEA's budget, as its perplexity
            ref["passkey_oracle"] = passkey_scores(recipe, model, tokenizer, "oracle")
    return ref


# harness headlines (sea_convert.harness.headline) where a higher number is better; the rest are perplexities
_SCORE_METRICS = ("acc", "ruler@")


def check_gates(recipe: Recipe, ppl: dict, mmlu: dict | None, passkey: dict | None = None,
                harness: dict | None = None) -> list[str]:
    gates, failures = recipe.validate_.gates, []
    if gates.max_harness_drop is not None:
        scored = {t: r for t, r in (harness or {}).items() if r["metric"].startswith(_SCORE_METRICS)}
        if not scored:
            failures.append("max_harness_drop is set but validate.harness runs no task scored by accuracy or RULER")
        for task, r in scored.items():
            if r["teacher"] - r["sea"] > gates.max_harness_drop:
                failures.append(f"{task} ({r['metric']}) drop {r['teacher'] - r['sea']:.4f} > max_harness_drop "
                                f"{gates.max_harness_drop}")
    if gates.max_passkey_drop is not None:
        if passkey is None:
            failures.append("max_passkey_drop is set but validate.passkey.lengths is empty")
        elif passkey["drop"] > gates.max_passkey_drop:
            failures.append(f"passkey accuracy drop {passkey['drop']:.4f} > max_passkey_drop {gates.max_passkey_drop}")
    if gates.max_ppl_ratio is not None and ppl["ppl_ratio"] > gates.max_ppl_ratio:
        failures.append(f"perplexity ratio {ppl['ppl_ratio']:.4f} > max_ppl_ratio {gates.max_ppl_ratio}")
    if gates.max_mmlu_drop is not None:
        if mmlu is None:
            failures.append("max_mmlu_drop is set but validate.mmlu.enabled is false")
        elif mmlu["drop"] > gates.max_mmlu_drop:
            failures.append(f"MMLU drop {mmlu['drop']:.4f} > max_mmlu_drop {gates.max_mmlu_drop}")
    return failures


def validate_stage(recipe: Recipe, model, tokenizer, splits: Splits, reference: dict, progress: bool = False) -> ValidationReport:
    """SEA's numbers after training, beside the teacher reference measured before it."""
    v = recipe.validate_
    windows = _windows(recipe, splits)
    sea_ppl, density = mode_perplexity(model, windows, "sea", progress)
    ppl = {"teacher_ppl": reference["teacher_ppl"], "sea_ppl": sea_ppl, "ppl_ratio": sea_ppl / reference["teacher_ppl"],
           "density": density, "ctx": int(windows.shape[1]), "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
           "windows": int(windows.shape[0])}
    if "oracle_ppl" in reference:
        ppl["oracle_ppl"], ppl["oracle_density"] = reference["oracle_ppl"], reference["oracle_density"]
    ppl["held_out_source"] = splits.held_out_source
    ppl["max_windows"] = v.perplexity.max_windows
    ppl["held_out_tokens"] = int(splits.held_out.numel())
    mmlu = None
    if v.mmlu.enabled:
        sea = mmlu_accuracy(model, tokenizer, "sea", v.mmlu.source, v.mmlu.shots, v.mmlu.limit, progress, v.mmlu.batch_size)
        mmlu = _mmlu_report(reference["mmlu"], sea, v.mmlu.source, v.mmlu.shots, v.mmlu.limit)
    harness = None
    if reference.get("harness"):
        sea_h = harness_scores(recipe, model, tokenizer, "sea")
        harness = {task: {"metric": next(iter(reference["harness"][task])), "teacher": next(iter(reference["harness"][task].values())),
                          "sea": next(iter(sea_h[task].values()))} for task in reference["harness"]}
    passkey = None
    if reference.get("passkey"):
        sea_p = passkey_scores(recipe, model, tokenizer, "sea")
        passkey = {"teacher": reference["passkey"], "sea": sea_p, "drop": reference["passkey"]["mean"] - sea_p["mean"]}
        if "passkey_oracle" in reference:
            passkey["oracle"] = reference["passkey_oracle"]
    return ValidationReport(ppl, mmlu, check_gates(recipe, ppl, mmlu, passkey, harness), harness, passkey)
