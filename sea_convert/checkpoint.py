"""Saving and loading a converted model.

A converted-model folder holds:
  config.json              the base config plus a `sea` block (SEA settings, base model, format)
  model.safetensors        base weights, a plain transformers checkpoint (unless save_base_weights=false,
                           then the `sea` block pins the base source and load() fetches it from there)
  sea_predictors.safetensors   the predictor weights of every layer
  tokenizer files, report.json, README.md (model card), attention.png
The folder is written under a temporary name and renamed at the end, so a crash
never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sea_convert.integration import attach_sea, attention_modules, predictors
from sea_convert.recipe import ModelSource, SEAConfig

FORMAT_VERSION = 1
PREDICTORS_FILE = "sea_predictors.safetensors"
_SEA_META_KEYS = ("format_version", "base_model", "base_finetuned")


class CheckpointError(ValueError):
    pass


def predictor_state(model) -> dict[str, torch.Tensor]:
    return {
        f"layers.{i}.{name}": t.detach().contiguous().cpu()
        for i, pred in enumerate(predictors(model))
        for name, t in pred.state_dict().items()
    }


def write_predictors(model, path: str | Path) -> None:
    """Every layer's predictor weights as one safetensors file (the format load() reads)."""
    save_file(predictor_state(model), str(path), metadata={"format": "sea-predictors-v1"})


def load_predictor_state(model, state: dict[str, torch.Tensor]) -> None:
    """The inverse of predictor_state: every layer's predictor from `layers.<i>.<name>` entries (strict)."""
    for i, pred in enumerate(predictors(model)):
        prefix = f"layers.{i}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        pred.load_state_dict(own, strict=True)


def _without_predictors(model):
    """Detach predictor submodules for the duration of a base-weights save."""
    mods = attention_modules(model)
    held = [m._modules.pop("sea_predictor") for m in mods]

    class _Restore:
        def __enter__(self):
            return model

        def __exit__(self, *exc):
            for m, p in zip(mods, held, strict=True):
                m.sea_predictor = p

    return _Restore()


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Fail early (before any training) if the destination exists and may not be replaced."""
    if path.exists() and not overwrite:
        raise CheckpointError(f"output folder {path} already exists (set output.overwrite or pass another --output)")


def _umask_modes(folder: Path) -> None:
    """Every file and folder of a checkpoint gets the mode the umask gives a new one: safetensors writes its
    files through a private temporary file (0600), the other writers leave 0644."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def save_converted(
    model,
    tokenizer,
    sea_cfg: SEAConfig,
    source: ModelSource,
    path: str | Path,
    *,
    report: dict | None = None,
    model_card: str | None = None,
    extra_files: dict[str, Path] | None = None,
    save_base_weights: bool = True,
    overwrite: bool = False,
    base_finetuned: bool = False,
) -> Path:
    final = Path(path)
    prepare_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        model.config.sea = {
            **sea_cfg.model_dump(mode="json"),
            "format_version": FORMAT_VERSION,
            "base_model": source.model_dump(mode="json"),
            # stage B changed the base weights: dense mode of this checkpoint is no longer the original teacher
            "base_finetuned": base_finetuned,
        }
        attn_before = model.config._attn_implementation
        model.config._attn_implementation_internal = "sdpa"  # a saved checkpoint opens with plain attention
        try:
            with _without_predictors(model):
                if save_base_weights:
                    model.save_pretrained(tmp)
                else:
                    model.config.save_pretrained(tmp)
        finally:
            model.config._attn_implementation_internal = attn_before
        write_predictors(model, tmp / PREDICTORS_FILE)
        tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        _umask_modes(tmp)
        if final.exists():  # overwrite: swap in, then drop the old one
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_sea_block(path: Path) -> tuple[SEAConfig, ModelSource]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file() or not (path / PREDICTORS_FILE).is_file():
        raise CheckpointError(f"{path} is not a converted SEA checkpoint (needs config.json and {PREDICTORS_FILE})")
    block = json.loads(cfg_file.read_text()).get("sea")
    if not isinstance(block, dict):
        raise CheckpointError(f"{cfg_file} has no `sea` block")
    if block.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: unsupported SEA format_version {block.get('format_version')!r}")
    sea = SEAConfig.model_validate({k: v for k, v in block.items() if k not in _SEA_META_KEYS})
    base = ModelSource.model_validate(block["base_model"])
    return sea, base


def context_limit(path: Path) -> int:
    """The longest window the checkpoint can score: its SEA position table (default: the model's positions)."""
    sea, _ = read_sea_block(path)  # a converted checkpoint, or CheckpointError
    if sea.position_table_len is not None:
        return sea.position_table_len
    return int(json.loads((path / "config.json").read_text())["max_position_embeddings"])


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Reload a converted checkpoint: (model in eval mode with SEA attention, tokenizer)."""
    from sea_convert.models import DTYPES, source_model

    path = Path(path)
    sea, base = read_sea_block(path)
    dtype = dtype or DTYPES[base.dtype]
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    else:  # predictors only: the base comes from its pinned source (a GGUF one dequantized: it publishes)
        model = source_model(base, dtype)
        model.config.sea = AutoConfig.from_pretrained(path).sea
    tokenizer = AutoTokenizer.from_pretrained(path)
    attach_sea(model, sea)
    load_predictor_state(model, load_file(str(path / PREDICTORS_FILE)))
    model.to(device).eval().requires_grad_(False)
    model.set_attn_implementation("sea")
    return model, tokenizer
