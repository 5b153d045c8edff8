"""Recipe text is parsed once, at an entry point (a recipe file, a REST body), by one function,
`sea_convert.recipe.recipe_data`; what runs later loads the validated recipe's JSON through
`sea_convert.recipe_json` alone. An AST scan of api/, workers/ and sea_convert/ finds every call that
parses YAML, validates a Recipe, loads a model from JSON, reads a recipe with json, or hands text to
the recipe readers; the places found must be exactly those listed here. A new one fails this test
until it is either removed or added below with the reason it is an entry point."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("api", "workers", "sea_convert")
YAML_LOADS = frozenset({"load", "safe_load", "full_load", "unsafe_load", "load_all", "safe_load_all",
                        "full_load_all", "unsafe_load_all"})
RECIPE_READERS = frozenset({"recipe_data", "read_recipe_file", "parse_recipe", "load_recipe", "load_recipe_json",
                            "stored_output_dir"})

# (file, function, call) -> why it is allowed
EXPECTED = {
    ("sea_convert/recipe.py", "recipe_data", "yaml.safe_load"): "the one parser of recipe text",
    ("sea_convert/recipe.py", "parse_recipe", "Recipe.model_validate"): "validation of parsed data, once",
    ("sea_convert/recipe.py", "read_recipe_file", "recipe_data"): "entry point: a recipe file",
    ("sea_convert/recipe.py", "load_recipe", "read_recipe_file"): "entry point: a recipe file",
    ("sea_convert/recipe.py", "load_recipe", "parse_recipe"): "entry point: a recipe file",
    ("api/cli.py", "_load_recipe", "load_recipe"): "entry point: the local CLI's recipe file",
    ("api/remote.py", "recipe_text", "read_recipe_file"): "entry point: the file `submit` sends",
    ("api/recipe_body.py", "read_recipe", "recipe_data"): "entry point: a REST body",
    ("api/recipe_body.py", "read_recipe", "parse_recipe"): "entry point: a REST body, under the policy",
    ("workers/service/ray_job.py", "standalone_job", "load_recipe"): "entry point: ray_job --recipe FILE",
    ("sea_convert/recipe_json.py", "_validate_stored", "model.model_validate_json"): "the one loader of stored JSON",
    ("sea_convert/recipe_json.py", "_validate_stored", "recipe_data"): "rows stored as YAML before 2026-12-05",
    ("workers/service/ray_job.py", "run_job", "load_recipe_json"): "a job's stored recipe",
    ("workers/service/service_loop.py", "submit_scheduled", "load_recipe_json"): "a schedule's stored recipe",
    ("workers/pipeline/job_paths.py", "stored_work_dir", "stored_output_dir"): "a stored recipe's output.dir",
    ("workers/train/train_worker.py", "train_worker", "load_recipe_json"): "the worker config's recipe JSON",
    ("workers/train/train_worker.py", "main", "WorkerConfig.model_validate_json"):
        "the worker's config file (its recipe stays a JSON string until load_recipe_json)",
}


def _yaml_names(tree: ast.AST) -> tuple[set[str], dict[str, str]]:
    """(names bound to the yaml module, {name bound to a load function: that function}) by this file's imports."""
    modules, loads = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "yaml"}
        elif isinstance(node, ast.ImportFrom) and node.module == "yaml":
            loads |= {a.asname or a.name: a.name for a in node.names if a.name in YAML_LOADS}
    return modules, loads


def _called(call: ast.Call, yaml_modules: set[str], yaml_loads: dict[str, str]) -> str | None:
    """The name of a recipe-parsing call, None for any other call."""
    f = call.func
    if isinstance(f, ast.Name):
        if f.id in yaml_loads:
            return f"yaml.{yaml_loads[f.id]}"
        return f.id if f.id in RECIPE_READERS else None
    if not isinstance(f, ast.Attribute):
        return None
    owner = ast.unparse(f.value)
    if owner in yaml_modules and f.attr in YAML_LOADS:
        return f"yaml.{f.attr}"
    if f.attr in RECIPE_READERS:
        return f.attr
    if f.attr == "model_validate_json" or (owner == "Recipe" and f.attr.startswith("model_validate")):
        return f"{owner}.{f.attr}"
    if owner == "json" and f.attr in ("load", "loads") and "recipe" in ast.unparse(call).lower():
        return f"json.{f.attr}"  # e.g. json.loads(job.recipe): the stored recipe read past its loader
    return None


def parse_sites(source: str, where: str) -> set[tuple[str, str, str]]:
    """(file, enclosing function, call) for every recipe-parsing call in `source`."""
    tree = ast.parse(source)
    yaml_modules, yaml_loads = _yaml_names(tree)
    found = set()

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call) and (name := _called(child, yaml_modules, yaml_loads)) is not None:
                found.add((where, function, name))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_the_scanner_sees_every_way_of_parsing_a_recipe():
    planted = (
        "import yaml as y, json\n"
        "from yaml import safe_load as sl, full_load\n"
        "from sea_convert.recipe import Recipe, parse_recipe\n"
        "def a(job):\n    return parse_recipe(y.safe_load(job.recipe))\n"
        "def b(text):\n    return Recipe.model_validate(sl(text))\n"
        "def c(job):\n    return json.loads(job.recipe)['output']\n"
        "async def d(text):\n    return Recipe.model_validate_json(text), full_load(text), y.load(text, Loader=y.SafeLoader)\n"
        "def e(work):\n    return json.loads((work / 'owner.json').read_text())\n"  # not a recipe
        "x = y.safe_load_all('a: 1')\n"
    )
    assert parse_sites(planted, "p.py") == {
        ("p.py", "a", "parse_recipe"), ("p.py", "a", "yaml.safe_load"), ("p.py", "b", "Recipe.model_validate"),
        ("p.py", "b", "yaml.safe_load"), ("p.py", "c", "json.loads"), ("p.py", "d", "Recipe.model_validate_json"),
        ("p.py", "d", "yaml.full_load"), ("p.py", "d", "yaml.load"), ("p.py", "<module>", "yaml.safe_load_all"),
    }


def test_recipe_text_is_parsed_only_at_the_entry_points():
    files = [f for pkg in SCANNED for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 40  # the packages were found and read
    found = set()
    for f in files:
        found |= parse_sites(f.read_text(encoding="utf-8"), f.relative_to(ROOT).as_posix())
    unexpected = sorted(found - EXPECTED.keys())
    missing = sorted(EXPECTED.keys() - found)
    assert not unexpected, f"recipe parsing outside the entry points and the stored-JSON loader: {unexpected}"
    assert not missing, f"listed here but gone from the code (update EXPECTED): {missing}"
    yaml_parsers = {(f, fn) for f, fn, call in found if call.startswith("yaml.")}
    assert yaml_parsers == {("sea_convert/recipe.py", "recipe_data")}  # one function parses YAML
    json_loaders = {(f, fn) for f, fn, call in found if call.endswith("model_validate_json") and "WorkerConfig" not in call}
    assert json_loaders == {("sea_convert/recipe_json.py", "_validate_stored")}  # one function loads stored JSON
