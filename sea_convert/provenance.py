"""What a run actually used: the resolved model revision and the data files' digests.

A scheduled re-distillation re-resolves these each time (a hub branch may have moved, a corpus
may have been refreshed); the report records them so two published versions can be told apart.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from sea_convert.recipe import DataConfig, ModelSource, TextSource


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_version(package: str) -> str | None:
    for dist in importlib.metadata.packages_distributions().get(package, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def model_provenance(src: ModelSource, config) -> dict:
    """`config` is the loaded model's config: transformers records the hub commit it resolved."""
    out: dict = {"source": src.describe()}
    if src.hub is not None:
        out["requested_revision"] = src.revision or "main"
        out["resolved_commit"] = getattr(config, "_commit_hash", None)
    elif src.package is not None:
        out["package_version"] = _package_version(src.package)
    if src.gguf_file is not None and src.package is None and src.path is not None:
        out["gguf_sha256"] = _sha256(src.path / src.gguf_file)
    elif src.path is not None and (src.path / "config.json").is_file():
        out["config_sha256"] = _sha256(src.path / "config.json")
    return out


def text_provenance(src: TextSource) -> dict:
    if src.path is not None:
        return {"path": str(src.path), "sha256": _sha256(src.path), "bytes": src.path.stat().st_size}
    return {"hub": src.hub, "config": src.config, "split": src.split, "max_documents": src.max_documents}


def data_provenance(cfg: DataConfig) -> dict:
    out = {"train": text_provenance(cfg.train)}
    if cfg.held_out is not None:
        out["held_out"] = text_provenance(cfg.held_out)
    return out
