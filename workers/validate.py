"""The validate stage: perplexity (teacher vs SEA on the same held-out windows), MMLU, gates."""

from __future__ import annotations

from dataclasses import dataclass, field

from sea_convert.data import Splits, eval_windows
from sea_convert.evaluate import compare_perplexity
from sea_convert.integration import attention_mode
from sea_convert.mmlu import load_mmlu, score_mmlu
from sea_convert.recipe import Recipe


@dataclass
class ValidationReport:
    perplexity: dict
    mmlu: dict | None
    gate_failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mmlu": self.mmlu, "gates_passed": self.passed, "gate_failures": self.gate_failures}


def mmlu_both(model, tokenizer, source: str, shots: int, limit: int | None, progress: bool = False) -> dict:
    questions = load_mmlu(source)
    out = {"shots": shots, "limit": limit, "source": source}
    for mode, name in (("dense", "teacher"), ("sea", "sea")):
        with attention_mode(model, mode):
            res = score_mmlu(model, tokenizer, questions, shots=shots, limit=limit, progress=progress)
        out[f"{name}_accuracy"] = res.accuracy
        out["questions"] = res.n
    out["drop"] = out["teacher_accuracy"] - out["sea_accuracy"]
    return out


def check_gates(recipe: Recipe, ppl: dict, mmlu: dict | None) -> list[str]:
    gates, failures = recipe.validate_.gates, []
    if gates.max_ppl_ratio is not None and ppl["ppl_ratio"] > gates.max_ppl_ratio:
        failures.append(f"perplexity ratio {ppl['ppl_ratio']:.4f} > max_ppl_ratio {gates.max_ppl_ratio}")
    if gates.max_mmlu_drop is not None:
        if mmlu is None:
            failures.append("max_mmlu_drop is set but validate.mmlu.enabled is false")
        elif mmlu["drop"] > gates.max_mmlu_drop:
            failures.append(f"MMLU drop {mmlu['drop']:.4f} > max_mmlu_drop {gates.max_mmlu_drop}")
    return failures


def validate_stage(recipe: Recipe, model, tokenizer, splits: Splits, progress: bool = False) -> ValidationReport:
    v = recipe.validate_
    windows = eval_windows(splits.held_out, v.perplexity.ctx, v.perplexity.max_windows)
    ppl = compare_perplexity(model, windows, progress=progress, oracle=v.perplexity.oracle).as_dict()
    ppl["held_out_source"] = splits.held_out_source
    ppl["max_windows"] = v.perplexity.max_windows
    ppl["held_out_tokens"] = int(splits.held_out.numel())
    mmlu = mmlu_both(model, tokenizer, v.mmlu.source, v.mmlu.shots, v.mmlu.limit, progress) if v.mmlu.enabled else None
    return ValidationReport(ppl, mmlu, check_gates(recipe, ppl, mmlu))
