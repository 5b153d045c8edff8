"""Import hygiene: one-way layering, no import cycles, no service packages in the library, no clash with hub `kernels`."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["api", "workers", "sea_convert", "kernels"]  # each may import only those after it


def _imported_top_packages(pkg: str) -> set[str]:
    found = set()
    for f in (ROOT / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_imports_flow_one_way():
    for i, pkg in enumerate(LAYERS):
        upward = set(LAYERS[:i]) & _imported_top_packages(pkg)
        assert not upward, f"{pkg} imports {upward}: imports must flow api -> workers -> sea_convert -> kernels"


def _project_modules() -> dict[str, Path]:
    """Every module of the layered packages by dotted name (a package by its own name, for its __init__)."""
    mods = {}
    for pkg in LAYERS:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in it (inside functions too). Relative imports
    are resolved; `from a import b` counts as importing a.b where that is a module, else a."""
    mods = _project_modules()

    def known(name: str) -> str | None:  # the most specific project module a dotted name lies in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                found |= {known(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else known(base) for a in node.names}
        graph[name] = found - {None, name}
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    graph = _import_graph()
    assert {"kernels.reference", "sea_convert.attention.decode", "workers.pipeline", "api.app"} <= graph.keys()
    assert "kernels.reference_select" in graph["kernels.reference"]  # the graph sees module-level imports ...
    assert "kernels.reference_block_rows" in graph["kernels.dispatch"]  # ... and those inside functions
    cycle = _a_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    """The kind of circle kernels.reference once closed with a lazy import in a module __getattr__."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "a.py").write_text("from . import b\n")
    (tmp_path / "kernels" / "b.py").write_text("def __getattr__(name):\n    from kernels.a import thing\n")
    for pkg in LAYERS[:-1]:
        (tmp_path / pkg).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _a_cycle(_import_graph()) == ["kernels.a", "kernels.b", "kernels.a"]


WORKER_LAYERS = ["service", "pipeline", "train"]  # workers/ by concern, each importing only those after it


def _imported_modules(folder: Path) -> set[str]:
    found = set()
    for f in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


def test_workers_subpackages_flow_one_way():
    subpackages = sorted(p.name for p in (ROOT / "workers").iterdir() if (p / "__init__.py").exists())
    assert subpackages == sorted(WORKER_LAYERS)
    assert not list((ROOT / "workers").glob("[!_]*.py")), "every worker module lives in one of the subpackages"
    for i, sub in enumerate(WORKER_LAYERS):
        upward = {m for m in _imported_modules(ROOT / "workers" / sub)
                  if m.split(".")[:2] in (["workers", s] for s in WORKER_LAYERS[:i])}
        assert not upward, f"workers.{sub} imports {upward}: imports must flow service -> pipeline -> train"


def test_library_pulls_in_no_service_packages():
    code = (
        "import sys, sea_convert, kernels, kernels.dispatch, kernels.reference\n"
        "import sea_convert.recipe, sea_convert.integration, sea_convert.distill, sea_convert.data\n"
        "import sea_convert.evaluate, sea_convert.checkpoint, sea_convert.models, sea_convert.mmlu\n"
        "bad = sorted(m for m in ('ray', 'fastapi', 's3fs') if m in sys.modules)\n"
        "print('loaded:', bad)\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "loaded: []" in res.stdout


def test_transformers_does_not_take_our_kernels_for_hub_kernels():
    code = (
        "import importlib.util, kernels\n"
        "assert importlib.util.find_spec('kernels').origin.endswith('kernels/__init__.py')\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "print('hub kernels available:', is_kernels_available())\n"
        "assert not is_kernels_available()\n"
        "import transformers.integrations.hub_kernels\n"  # would try `from kernels import ...` if fooled
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, vocab_size=50))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hub kernels available: False" in res.stdout
