"""`--set KEY=VALUE` for the scripts that run a recipe with a few fields changed (service_e2e.py, stage_a_paths.py)."""

from __future__ import annotations

import yaml


def set_field(recipe: dict, item: str) -> None:
    """--set distill.stage_a.steps=120: one recipe field for this run, its value read as YAML."""
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = recipe
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = yaml.safe_load(value)
