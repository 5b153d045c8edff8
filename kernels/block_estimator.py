"""The block-row estimator in Triton, from the raw keys and values (`sea.predictor_rows: block`).

Contract: `kernels.reference_block_rows.block_rows_estimate` (same signature, same output). That
reference builds the keys' positive random features and the values [v, positions] as fp32 tensors
((B, Hkv, T, m) and (B, Hkv, T, 2d), 0.4 GB at 32k with 8 KV heads) and runs the block-row linear
attention over them. Here neither is stored: each program recomputes its key block's features from
k (one (bs x d) @ (d x m) product, tf32x3: about fp32's accuracy, which the features' exp needs) and
reads its tile of values from v or from the position table in place. Two passes over the key blocks,
as `kernels.linear_attention`'s: pass 1 sums each segment's state (kf^T [v, p] and kf) per KV head; a
small exclusive prefix over segments; pass 2 walks each segment's blocks from there, block i's row
(all G query heads of the KV head at once) reading the state plus the block's first key.

Backward goes through the reference by autograd (exact, memory-hungry), as the other estimator's.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels import reference_block_rows
from kernels.linear_attention import _grads_through

BLOCK_DV = 64  # value columns per program: the (m x BLOCK_DV) fp32 state stays in registers
TARGET_PROGRAMS = 512  # programs per pass: enough to fill an H100/H200 twice over, few segments to prefix
FEATURE_PRECISION = "tf32x3"  # plain tf32 would put ~1e-3 relative error into w.x, then through exp


@triton.jit
def _block_tile(P, kb_ptr, vb_ptr, first, T, root, shift, projT, is_pos,
                skt, skd, svt, svd, spt, spd,
                offs_c, offs_d, d_ok, m_ok, cols, c_ok, PREC: tl.constexpr):
    """One key block's features (BS x BLOCK_M, zero past T and past m) and its tile of values (BS x BLOCK_DV):
    v's columns, or the position table's (is_pos)."""
    rows = first + offs_c
    r_ok = rows < T
    kx = tl.load(kb_ptr + rows[:, None] * skt + offs_d[None, :] * skd, mask=r_ok[:, None] & d_ok[None, :],
                 other=0.0).to(tl.float32) * root
    wx = tl.dot(kx, projT, input_precision=PREC)
    half_sq = 0.5 * tl.sum(kx * kx, axis=1)
    kf = tl.exp(wx - half_sq[:, None] - shift) + 1e-6
    kf = tl.where(r_ok[:, None] & m_ok[None, :], kf, 0.0)
    tile_ok = r_ok[:, None] & c_ok[None, :]
    vals = tl.load(vb_ptr + rows[:, None] * svt + cols[None, :] * svd, mask=tile_ok & (is_pos == 0), other=0.0)
    pos = tl.load(P + rows[:, None] * spt + cols[None, :] * spd, mask=tile_ok & (is_pos != 0), other=0.0)
    return kf, vals.to(tl.float32) + pos.to(tl.float32)


@triton.jit
def _program_setup(PROJ, SHIFT, pid_bh, pid_t, M, D,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TILES: tl.constexpr):
    """What every program of both passes starts from: the projection transposed (BLOCK_D x BLOCK_M), this
    sequence and head's key stabiliser, and which half of the values (v or positions) and columns it owns."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    projT = tl.load(PROJ + offs_m[None, :] * D + offs_d[:, None], mask=m_ok[None, :] & d_ok[:, None], other=0.0)
    shift = tl.load(SHIFT + pid_bh)
    is_pos = pid_t // TILES
    cols = (pid_t % TILES) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    return offs_m, offs_d, m_ok, d_ok, projT, shift, is_pos, cols, cols < D


@triton.jit
def _segment_state(
    K, V, P, PROJ, SHIFT, STATE, NORM,
    T, M, D, SEG_BLOCKS, root,
    skb, skh, skt, skd, svb, svh, svt, svd, spt, spd,
    BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TILES: tl.constexpr,
    HK: tl.constexpr, NSEG: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 1: each segment's own sum of kf^T [v, p] (this program's columns) and of kf, per KV head."""
    pid_bh, seg, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = pid_bh // HK, pid_bh % HK
    offs_m, offs_d, m_ok, d_ok, projT, shift, is_pos, cols, c_ok = _program_setup(
        PROJ, SHIFT, pid_bh, pid_t, M, D, BLOCK_M, BLOCK_D, BLOCK_DV, TILES)
    offs_c = tl.arange(0, BS)
    kb_ptr = K + b * skb + hk * skh
    vb_ptr = V + b * svb + hk * svh
    state = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    norm = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in range(seg * SEG_BLOCKS, tl.minimum(tl.cdiv(T, BS), (seg + 1) * SEG_BLOCKS)):
        kf, vals = _block_tile(P, kb_ptr, vb_ptr, i * BS, T, root, shift, projT, is_pos, skt, skd, svt, svd,
                               spt, spd, offs_c, offs_d, d_ok, m_ok, cols, c_ok, PREC)
        state += tl.dot(tl.trans(kf), vals)
        norm += tl.sum(kf, axis=0)
    slot = (pid_bh * NSEG + seg) * (2 * TILES) + pid_t
    tl.store(STATE + slot * BLOCK_M * BLOCK_DV + offs_m[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :], state)
    tl.store(NORM + slot * BLOCK_M + offs_m, norm)


@triton.jit
def _block_rows(
    QF, K, V, P, PROJ, SHIFT, STATE0, NORM0, OUT,
    T, M, D, SEG_BLOCKS, root,
    sqb, sqh, sqr, skb, skh, skt, skd, svb, svh, svt, svd, spt, spd, sob, soh, sor,
    G: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, TILES: tl.constexpr, HK: tl.constexpr, NSEG: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 2: each (KV head, segment, value tile) walks its key blocks from the sum of all earlier segments;
    block i's row reads the state plus the block's first key, then the whole block joins the state."""
    pid_bh, seg, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = pid_bh // HK, pid_bh % HK
    offs_m, offs_d, m_ok, d_ok, projT, shift, is_pos, cols, c_ok = _program_setup(
        PROJ, SHIFT, pid_bh, pid_t, M, D, BLOCK_M, BLOCK_D, BLOCK_DV, TILES)
    offs_c = tl.arange(0, BS)
    offs_g = tl.arange(0, GP)
    g_ok = offs_g < G
    heads = hk * G + offs_g
    q_ptr = QF + b * sqb + heads * sqh
    o_ptr = OUT + b * sob + heads * soh + is_pos * D
    kb_ptr = K + b * skb + hk * skh
    vb_ptr = V + b * svb + hk * svh
    slot = (pid_bh * NSEG + seg) * (2 * TILES) + pid_t
    state = tl.load(STATE0 + slot * BLOCK_M * BLOCK_DV + offs_m[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :])
    norm = tl.load(NORM0 + slot * BLOCK_M + offs_m)
    first_row = (offs_c == 0)[:, None]
    for i in range(seg * SEG_BLOCKS, tl.minimum(tl.cdiv(T, BS), (seg + 1) * SEG_BLOCKS)):
        kf, vals = _block_tile(P, kb_ptr, vb_ptr, i * BS, T, root, shift, projT, is_pos, skt, skd, svt, svd,
                               spt, spd, offs_c, offs_d, d_ok, m_ok, cols, c_ok, PREC)
        qf = tl.load(q_ptr[:, None] + i * sqr + offs_m[None, :], mask=g_ok[:, None] & m_ok[None, :], other=0.0)
        kf0 = tl.sum(tl.where(first_row, kf, 0.0), axis=0)  # the block's first key: its row reads it
        v0 = tl.sum(tl.where(first_row, vals, 0.0), axis=0)
        a0 = tl.sum(qf * kf0[None, :], axis=1)
        num = tl.dot(qf, state) + a0[:, None] * v0[None, :]
        den = tl.sum(qf * norm[None, :], axis=1) + a0
        tl.store(o_ptr[:, None] + i * sor + cols[None, :], num / tl.maximum(den, 1e-30)[:, None],
                 mask=g_ok[:, None] & c_ok[None, :])
        state += tl.dot(tl.trans(kf), vals)
        norm += tl.sum(kf, axis=0)


def _forward(q_feat, k, v, position_values, projection, scale: float, block_size: int) -> torch.Tensor:
    B, H, R, M = q_feat.shape
    _, Hk, T, D = k.shape
    root = math.sqrt(scale)
    qf = q_feat.float().contiguous()
    proj = projection.float().contiguous()
    # each sequence and head's key stabiliser: from its first key alone (positive_features' rule)
    shift = ((k[:, :, 0].float() * root) @ proj.T).amax(-1).reshape(B * Hk).contiguous()
    out = torch.empty(B, H, R, 2 * D, device=q_feat.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2(M))
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = min(BLOCK_DV, block_d)
    tiles = triton.cdiv(D, block_dv)  # per half: v's columns, then the positions'
    nseg = max(1, min(R, triton.cdiv(TARGET_PROGRAMS, B * Hk * 2 * tiles)))
    seg_blocks = triton.cdiv(R, nseg)
    nseg = triton.cdiv(R, seg_blocks)
    grid = (B * Hk, nseg, 2 * tiles)
    common = dict(BS=block_size, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_DV=block_dv, TILES=tiles, HK=Hk, NSEG=nseg,
                  PREC=FEATURE_PRECISION, num_warps=8 if block_m * block_dv > 64 * 64 else 4,
                  num_stages=1)  # tf32x3 operands in fp32: pipelined copies would pass 228 KB of shared memory (H100)
    strides = (*k.stride(), *v.stride(), *position_values.stride())
    state = torch.empty(B * Hk, nseg, 2 * tiles, block_m, block_dv, device=k.device, dtype=torch.float32)
    norm = torch.empty(B * Hk, nseg, 2 * tiles, block_m, device=k.device, dtype=torch.float32)
    _segment_state[grid](k, v, position_values, proj, shift, state, norm, T, M, D, seg_blocks, root, *strides, **common)
    state0 = (state.cumsum(1) - state).contiguous()  # exclusive prefix over segments
    norm0 = (norm.cumsum(1) - norm).contiguous()
    G = H // Hk
    _block_rows[grid](qf, k, v, position_values, proj, shift, state0, norm0, out, T, M, D, seg_blocks, root,
                      *qf.stride()[:3], *strides, *out.stride()[:3], G=G, GP=max(16, triton.next_power_of_2(G)),
                      **common)
    return out


class _BlockRowsEstimate(torch.autograd.Function):
    """Forward in Triton; backward by autograd through the reference (the position table learns in stage A)."""

    @staticmethod
    def forward(ctx, q_feat, k, v, position_values, projection, scale, block_size):
        ctx.save_for_backward(q_feat, k, v, position_values, projection)
        ctx.scale, ctx.block_size = scale, block_size
        return _forward(q_feat, k, v, position_values, projection, scale, block_size)

    @staticmethod
    def backward(ctx, grad_out):
        def op(*x):
            return reference_block_rows.block_rows_estimate(*x, ctx.scale, ctx.block_size)

        return (*_grads_through(op, ctx.saved_tensors, grad_out), None, None)


@torch.compiler.disable  # inductor's own compile of the kernel failed on the H100 (2026-12-06); eager launch
def block_rows_estimate(q_feat: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_values: torch.Tensor,
                        projection: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    if block_size not in (16, 32, 64, 128):  # one key block is one tile, as in the block-sparse kernel
        raise ValueError(f"block_size must be 16, 32, 64 or 128, got {block_size}")
    if position_values.shape[0] < k.shape[2]:
        raise ValueError(f"position table of {position_values.shape[0]} rows is shorter than the {k.shape[2]} keys")
    return _BlockRowsEstimate.apply(q_feat, k, v, position_values, projection, float(scale), int(block_size))
