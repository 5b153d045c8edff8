"""Each query block's opening mean in Triton (`sea.predictor_rows: block`): one pass over x at memory speed.

Contract: `kernels.reference_block_rows.opening_means(x, block_size)` (same signature, same output): for block i,
the mean of the block_size rows ending at its first row (rows i*bs - bs + 1 .. i*bs; fewer at the start).
These windows split the rows between them, so each program reads its blocks' windows once, in x's dtype and
strides (q arrives as a transposed view), and sums them in fp32. (Compiled by inductor, the reference's
per-block sums read q at a third of the bandwidth: 0.23 ms at 32k on an H100, docs/benchmarks.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels.tiles import pow2

BLOCKS_PER_PROGRAM = 4


@triton.jit
def _opening_means(X, OUT, T, D, NB, H,
                   sxb, sxh, sxt, sxd,
                   BS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKS: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs = tl.arange(0, BS)
    cols = tl.arange(0, BLOCK_D)
    d_ok = cols < D
    base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh  # int64: x may pass 2^31 elements
    out = OUT + bh.to(tl.int64) * NB * D
    for i in range(pid * BLOCKS, tl.minimum(NB, (pid + 1) * BLOCKS)):
        rows = i * BS - BS + 1 + offs  # the window ends at the block's first row, which is < T
        x = tl.load(base + rows[:, None].to(tl.int64) * sxt + cols[None, :] * sxd,
                    mask=(rows >= 0)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        count = tl.minimum(i * BS + 1, BS).to(tl.float32)
        tl.store(out + i * D + cols, tl.sum(x, axis=0) / count, mask=d_ok)


@torch.compiler.disable  # launched eagerly, as the estimator's kernels beside it
def opening_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, NQB, d) fp32, as kernels.reference_block_rows.opening_means."""
    if block_size not in (16, 32, 64, 128):  # a window is one tile, as the block-sparse kernel's key blocks
        raise ValueError(f"block_size must be 16, 32, 64 or 128, got {block_size}")
    B, H, T, d = x.shape
    nb = triton.cdiv(T, block_size)
    out = torch.empty(B, H, nb, d, device=x.device, dtype=torch.float32)
    _opening_means[(triton.cdiv(nb, BLOCKS_PER_PROGRAM), B * H)](
        x, out, T, d, nb, H, *x.stride(), BS=block_size, BLOCK_D=pow2(d), BLOCKS=BLOCKS_PER_PROGRAM,
        num_warps=4 if block_size * d <= 64 * 128 else 8)
    return out
