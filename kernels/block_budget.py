"""The block budget of block mode: how many key blocks each KV head keeps in a query block.

The one definition of the rule. The selection (select_key_blocks, its Triton version), the decoder's
selection, the host's bounds on the lists' widths and the benchmarks all read it from a BlockBudget;
only the decoder's selection kernel (kernels.decode_step_select) re-expresses it in tl ops, from these fields.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch


def _f32(x: float) -> float:
    """x rounded to float32: the density rule runs in fp32 on the device, so the host's copy must too."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True, kw_only=True)
class BlockBudget:
    """Query block i keeps, per KV head (the heads of a query block share budget x Hkv blocks),
    min(i + 1, max(base(i), sink_blocks + local_blocks)) key blocks: base(i) is per_head, or
    ceil(density * (i + 1)); never fewer than the forced sink and local blocks, never more than the
    i + 1 causal ones."""

    sink_blocks: int  # leading key blocks always kept
    local_blocks: int  # diagonal (most recent) key blocks always kept
    per_head: int | None = None  # a fixed number of key blocks per KV head ...
    density: float | None = None  # ... or this share of the query block's causal key blocks, rounded up

    def __post_init__(self):
        if (self.per_head is None) == (self.density is None):
            raise ValueError(f"give one of per_head, density; got per_head={self.per_head}, density={self.density}")

    @classmethod
    def from_keys(cls, keys: int, block_size: int, *, sink_blocks: int, local_blocks: int) -> BlockBudget:
        """A budget of `keys` keys per head per query, in whole blocks rounded up."""
        return cls(per_head=math.ceil(keys / block_size), sink_blocks=sink_blocks, local_blocks=local_blocks)

    def blocks(self, i: int) -> int:
        """Key blocks each KV head keeps in query block i (host numbers: no device sync)."""
        base = self.per_head if self.density is None else math.ceil(_f32(_f32(self.density) * (i + 1)))
        return min(i + 1, max(base, self.sink_blocks + self.local_blocks))

    def blocks_tensor(self, i: torch.Tensor) -> torch.Tensor:
        """blocks() of query blocks at positions i (an integer tensor of any shape), on i's device."""
        if self.density is None:
            base = torch.full_like(i, self.per_head)
        else:
            base = torch.ceil(self.density * (i + 1).float()).long()
        return torch.minimum(i + 1, base.clamp_min(self.sink_blocks + self.local_blocks))

    def bound(self, num_key_blocks: int) -> int:
        """The most blocks one KV head keeps in any query block up to num_key_blocks - 1 (the rule never
        shrinks with i): with it, selection needs no device sync and its lists have a fixed width."""
        return self.blocks(num_key_blocks - 1)
