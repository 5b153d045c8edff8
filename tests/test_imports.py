"""Import hygiene: one-way layering, no service packages in the library, no clash with hub `kernels`."""

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
