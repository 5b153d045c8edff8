"""A teacher too large for one host's memory: built on the meta device, sharded by FSDP2, then
each rank allocates and reads only its own rows of every weight (safetensors slices).

Nothing here holds a whole weight except the small non-persistent buffers (rotary tables), which
are built for real on the CPU and put back after the parameters are allocated.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoModelForCausalLM

from sea_convert.checkpoint import PREDICTORS_FILE


class ShardLoadError(ValueError):
    pass


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device (no memory); buffers stay real."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every (sharded) meta parameter on `device`, uninitialised; real tensors (buffers, the
    predictors) keep their values."""
    real = {name: t.detach().clone() for name, t in _tensors(model) if not _is_meta(t)}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in _tensors(model):
            if name in real:
                _local(t).copy_(real[name])


def _tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _is_meta(t: torch.Tensor) -> bool:
    return (t.to_local() if isinstance(t, DTensor) else t).is_meta


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows [start, end) of the whole weight that this rank holds (FSDP2 shards dim 0 as torch.chunk)."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.ndim else 1
    if param.device_mesh.ndim != 1 or not isinstance(param.placements[0], Shard) or param.placements[0].dim != 0:
        raise ShardLoadError(f"only 1-D meshes sharded on dim 0 are supported, got {param.placements}")
    rows, world = param.shape[0], param.device_mesh.size()
    chunk = math.ceil(rows / world)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    return start, min(start + chunk, rows)


def _weight_files(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in Path(folder).glob("*.safetensors") if p.name != PREDICTORS_FILE)
    if not files:
        raise ShardLoadError(f"{folder}: no *.safetensors weights to load shard by shard")
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            where.update({key: path for key in f.keys()})
    return where


def load_sharded_weights(model: nn.Module, folder: Path) -> int:
    """Copy this rank's rows of every base weight from the folder's safetensors files; returns the
    bytes read. Predictor weights are not the teacher's and are skipped."""
    where = _weight_files(folder)
    wanted = [(n, p) for n, p in model.named_parameters() if "sea_predictor" not in n]
    missing = [n for n, _ in wanted if n not in where]
    if missing:
        raise ShardLoadError(f"{folder}: {len(missing)} weights not found in its safetensors files, e.g. {missing[0]}"
                             " (set distill.parallel.meta_init: false to load the model whole)")
    read = 0
    by_file: dict[Path, list] = {}
    for name, p in wanted:
        by_file.setdefault(where[name], []).append((name, p))
    with torch.no_grad():
        for path, params in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name, p in params:
                    whole = f.get_slice(name)
                    if list(whole.get_shape()) != list(p.shape):
                        raise ShardLoadError(f"{path.name}: {name} has shape {whole.get_shape()}, the model wants {list(p.shape)}")
                    start, end = shard_rows(p)
                    rows = whole[start:end] if p.ndim else whole[:]
                    _local(p).copy_(rows.to(p.dtype).reshape(_local(p).shape))
                    read += rows.numel() * rows.element_size()
    return read


def init_random_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Benchmark weights for a model no checkpoint exists for: normal(0, std) matrices, unit norms.
    Each rank draws its own shard (seeded by seed and rank), so nothing whole is ever built."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed * 1000 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sea_predictor" in name:
                continue
            local = _local(p)
            if local.ndim == 1:
                local.fill_(1.0 if "norm" in name else 0.0)
            else:
                local.normal_(0.0, std, generator=gen)
