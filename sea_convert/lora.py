"""Low-rank adapters on the attention projections, for stage B.

Applied from outside the model code: each targeted nn.Linear inside an attention module is
replaced by a `LoRALinear` that wraps it. Switching the adapters off (`adapters_off`) gives back
the exact base model, which is how stage B gets its teacher without a second copy of the weights.
`merge_lora` folds the adapters into the base weights and puts plain nn.Linear layers back, so a
converted checkpoint is an ordinary transformers checkpoint.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from sea_convert.integration import attention_modules


class LoRALinear(nn.Module):
    """y = base(x) + scale * (x A^T) B^T, with B initialised to zero (the start equals the base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.enabled = True
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and peft)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        delta = (x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return y + (self.scale * delta).to(y.dtype)

    def merged(self) -> nn.Linear:
        lin = self.base
        with torch.no_grad():
            delta = self.scale * (self.lora_b @ self.lora_a)
            lin.weight.add_(delta.to(lin.weight.dtype))
        return lin


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> list[LoRALinear]:
    """Wrap the named projections of every attention module; raises if no target name matches."""
    wrapped = []
    for attn in attention_modules(model):
        for name in targets:
            child = getattr(attn, name, None)
            if isinstance(child, LoRALinear):
                raise ValueError(f"{name} already has a LoRA adapter")
            if isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha)
                setattr(attn, name, lora)
                wrapped.append(lora)
    if not wrapped:
        raise ValueError(f"none of lora_targets {targets} is a linear layer of this model's attention modules")
    return wrapped


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Inside the block the model computes exactly as its base weights (the stage B teacher)."""
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before, strict=True):
            m.enabled = e


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and restore plain nn.Linear layers; returns how many."""
    n = 0
    for attn in attention_modules(model):
        for name, child in list(attn.named_children()):
            if isinstance(child, LoRALinear):
                setattr(attn, name, child.merged())
                n += 1
    return n


def remove_lora(model: nn.Module) -> int:
    """Drop every adapter without merging (back to the base weights)."""
    n = 0
    for attn in attention_modules(model):
        for name, child in list(attn.named_children()):
            if isinstance(child, LoRALinear):
                setattr(attn, name, child.base)
                n += 1
    return n
