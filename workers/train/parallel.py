"""Parallelism applied from outside the model code (issue 6): FSDP2 (`fully_shard`) on the frozen
teacher's decoder blocks with an explicit mixed-precision policy, data parallelism for the SEA
predictors (kept whole on every rank: FSDP ignores them, gradients are averaged), and each rank's
share of a global batch, so the recipe's batch size means the same thing on 1 or N workers."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sea_convert.integration import predictors


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    blocks = getattr(base, "layers", None) or getattr(getattr(base, "decoder", None), "layers", None)
    if blocks is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return blocks


def shard_teacher(model: nn.Module, param_dtype: torch.dtype | None = None,
                  reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each decoder block, the base model, then the root; the predictors stay whole (ignored_params)."""
    ignored = {p for pred in predictors(model) for p in pred.parameters()}
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=mp, ignored_params=ignored, reshard_after_forward=reshard_after_forward)
    base = getattr(model, "model", None)
    if base is not None:  # its own unit: the stage-A teacher pass calls the base model without the LM head
        fully_shard(base, mp_policy=mp, ignored_params=ignored, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, ignored_params=ignored, reshard_after_forward=reshard_after_forward)
    return model


def rank_rows(global_batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a global batch: rows rank, rank + world, ... (no overlap, none left out)."""
    if global_batch.shape[0] % world:
        raise ValueError(f"the global batch ({global_batch.shape[0]} windows) does not split over {world} workers:"
                         " make distill.stage_a.batch_size a multiple of the worker count")
    return global_batch[rank::world]


def gradient_averager(params: list[nn.Parameter]):
    """A grad_sync for a trainer: one all-reduce of all gradients (flattened), divided by the world size.
    With each rank's loss the mean over its rows, the result is the gradient of the global mean."""
    def sync() -> None:
        _, world = rank_and_world()
        if world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n
    return sync
