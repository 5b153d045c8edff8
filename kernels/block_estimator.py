"""The block-row estimator in Triton, from the raw keys and values (`sea.predictor_rows: block`).

Contract: `kernels.reference_block_rows.block_rows_estimate` (same signature, same output). That
reference builds the keys' positive random features and the values [v, positions] as fp32 tensors
((B, Hkv, T, m) and (B, Hkv, T, 2d), 0.4 GB at 32k with 8 KV heads) and runs the block-row linear
attention over them. Here neither is stored. Each program owns a slice of the random features (FEATURE_TILE
of them) and every value column: it makes its slice of each key block's features from k (one
(bs x d) @ (d x FT) product in tf32x3, about fp32's accuracy, which the features' exp needs) and reads v and
the position table in place. So the features are computed once per pass in all. (A first version split
the value columns instead and recomputed all features for each of four tiles: 4.15 ms at 32k on an H100.)
Two passes over the key blocks, as `kernels.linear_attention`'s: pass 1 sums each segment's state
(kf^T v, kf^T p and kf) per KV head; a small exclusive prefix over segments; pass 2 walks each segment's
blocks from there, block i's row (all G query heads of the KV head at once) reading the state plus the
block's first key. Each slice writes its numerators and denominator; the launcher adds the slices and
divides.

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
from kernels.tiles import MIN_ROWS, pow2

FEATURE_TILE = 32  # random features per program: each program owns a slice of the features, all value columns
TARGET_PROGRAMS = 512  # programs per pass: enough to fill an H100/H200 twice over, few segments to prefix
FEATURE_PRECISION = "tf32x3"  # plain tf32 would put ~1e-3 relative error into w.x, then through exp


@triton.jit
def _block_tile(P, kb_ptr, vb_ptr, first, T, root, shift, projT,
                skt, skd, svt, svd, spt, spd, offs_c, offs_d, d_ok, m_ok, PREC: tl.constexpr):
    """One key block: this program's slice of its features (BS x FT, zero past T and past m), and its values'
    two halves, v and the position table (BS x BLOCK_D each, fp32)."""
    rows = first + offs_c
    r_ok = rows < T
    tile_ok = r_ok[:, None] & d_ok[None, :]
    kx = tl.load(kb_ptr + rows[:, None] * skt + offs_d[None, :] * skd, mask=tile_ok, other=0.0).to(tl.float32) * root
    wx = tl.dot(kx, projT, input_precision=PREC)
    half_sq = 0.5 * tl.sum(kx * kx, axis=1)
    kf = tl.where(r_ok[:, None] & m_ok[None, :], tl.exp(wx - half_sq[:, None] - shift) + 1e-6, 0.0)
    vv = tl.load(vb_ptr + rows[:, None] * svt + offs_d[None, :] * svd, mask=tile_ok, other=0.0).to(tl.float32)
    pp = tl.load(P + rows[:, None] * spt + offs_d[None, :] * spd, mask=tile_ok, other=0.0).to(tl.float32)
    return kf, vv, pp


@triton.jit
def _program_setup(PROJ, SHIFT, pid_bh, pid_m, M, D, FT: tl.constexpr, BLOCK_D: tl.constexpr):
    """What every program of both passes starts from: its slice of the projection, transposed (BLOCK_D x FT),
    and this sequence and head's key stabiliser."""
    offs_m = pid_m * FT + tl.arange(0, FT)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    projT = tl.load(PROJ + offs_m[None, :] * D + offs_d[:, None], mask=m_ok[None, :] & d_ok[:, None], other=0.0)
    return offs_m, offs_d, m_ok, d_ok, projT, tl.load(SHIFT + pid_bh)


@triton.jit
def _segment_state(
    K, V, P, PROJ, SHIFT, STATE, NORM,
    T, M, D, SEG_BLOCKS, root,
    skb, skh, skt, skd, svb, svh, svt, svd, spt, spd,
    BS: tl.constexpr, FT: tl.constexpr, MT: tl.constexpr, BLOCK_D: tl.constexpr, HK: tl.constexpr,
    NSEG: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 1: each segment's own sums of kf^T v, kf^T p and kf over this program's features, per KV head."""
    pid_bh, seg, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = pid_bh // HK, pid_bh % HK
    offs_m, offs_d, m_ok, d_ok, projT, shift = _program_setup(PROJ, SHIFT, pid_bh, pid_m, M, D, FT, BLOCK_D)
    offs_c = tl.arange(0, BS)
    kb_ptr = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh  # int64: k and v may pass 2^31 elements
    vb_ptr = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    state_v = tl.zeros((FT, BLOCK_D), dtype=tl.float32)
    state_p = tl.zeros((FT, BLOCK_D), dtype=tl.float32)
    norm = tl.zeros((FT,), dtype=tl.float32)
    for i in range(seg * SEG_BLOCKS, tl.minimum(tl.cdiv(T, BS), (seg + 1) * SEG_BLOCKS)):
        kf, vv, pp = _block_tile(P, kb_ptr, vb_ptr, i * BS, T, root, shift, projT, skt, skd, svt, svd, spt, spd,
                                 offs_c, offs_d, d_ok, m_ok, PREC)
        kft = tl.trans(kf)
        state_v += tl.dot(kft, vv)
        state_p += tl.dot(kft, pp)
        norm += tl.sum(kf, axis=0)
    slot = (pid_bh * NSEG + seg) * MT + pid_m
    at = STATE + slot * 2 * FT * BLOCK_D + tl.arange(0, FT)[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(at, state_v)
    tl.store(at + FT * BLOCK_D, state_p)
    tl.store(NORM + slot * FT + tl.arange(0, FT), norm)


@triton.jit
def _block_rows(
    QF, K, V, P, PROJ, SHIFT, STATE0, NORM0, PART,
    T, M, D, R, SEG_BLOCKS, root,
    sqb, sqh, sqr, skb, skh, skt, skd, svb, svh, svt, svd, spt, spd,
    G: tl.constexpr, GP: tl.constexpr, H: tl.constexpr, BS: tl.constexpr, FT: tl.constexpr, MT: tl.constexpr,
    BLOCK_D: tl.constexpr, HK: tl.constexpr, NSEG: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 2: each (KV head, segment, feature slice) walks its key blocks from the sum of all earlier segments;
    block i's row (all G query heads at once) reads the state plus the block's first key, then the whole block
    joins the state. Its numerators [v | p] and denominator over this slice of the features go to PART
    (MT, B, H, R, 2D + 1); the launcher sums the slices and divides."""
    pid_bh, seg, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = pid_bh // HK, pid_bh % HK
    offs_m, offs_d, m_ok, d_ok, projT, shift = _program_setup(PROJ, SHIFT, pid_bh, pid_m, M, D, FT, BLOCK_D)
    offs_c = tl.arange(0, BS)
    offs_g = tl.arange(0, GP)
    g_ok = offs_g < G
    heads = hk * G + offs_g
    q_ptr = QF + b * sqb + heads * sqh
    kb_ptr = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh  # int64: k and v may pass 2^31 elements
    vb_ptr = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    slot = (pid_bh * NSEG + seg) * MT + pid_m
    at = STATE0 + slot * 2 * FT * BLOCK_D + tl.arange(0, FT)[:, None] * BLOCK_D + offs_d[None, :]
    state_v = tl.load(at)
    state_p = tl.load(at + FT * BLOCK_D)
    norm = tl.load(NORM0 + slot * FT + tl.arange(0, FT))
    first_row = (offs_c == 0)[:, None]
    width = 2 * D + 1
    batch = tl.num_programs(0) // HK
    for i in range(seg * SEG_BLOCKS, tl.minimum(tl.cdiv(T, BS), (seg + 1) * SEG_BLOCKS)):
        kf, vv, pp = _block_tile(P, kb_ptr, vb_ptr, i * BS, T, root, shift, projT, skt, skd, svt, svd, spt, spd,
                                 offs_c, offs_d, d_ok, m_ok, PREC)
        qf = tl.load(q_ptr[:, None] + i * sqr + offs_m[None, :], mask=g_ok[:, None] & m_ok[None, :], other=0.0)
        a0 = tl.sum(qf * tl.sum(tl.where(first_row, kf, 0.0), axis=0)[None, :], axis=1)  # the block's first key
        num_v = tl.dot(qf, state_v) + a0[:, None] * tl.sum(tl.where(first_row, vv, 0.0), axis=0)[None, :]
        num_p = tl.dot(qf, state_p) + a0[:, None] * tl.sum(tl.where(first_row, pp, 0.0), axis=0)[None, :]
        den = tl.sum(qf * norm[None, :], axis=1) + a0
        base = PART + (((pid_m * batch + b) * H + heads) * R + i).to(tl.int64) * width
        out_ok = g_ok[:, None] & d_ok[None, :]
        tl.store(base[:, None] + offs_d[None, :], num_v, mask=out_ok)
        tl.store(base[:, None] + D + offs_d[None, :], num_p, mask=out_ok)
        tl.store(base + 2 * D, den, mask=g_ok)
        kft = tl.trans(kf)
        state_v += tl.dot(kft, vv)
        state_p += tl.dot(kft, pp)
        norm += tl.sum(kf, axis=0)


def _forward(q_feat, k, v, position_values, projection, scale: float, block_size: int,
             feature_tile: int = FEATURE_TILE) -> torch.Tensor:
    B, H, R, M = q_feat.shape
    _, Hk, T, D = k.shape
    root = math.sqrt(scale)
    qf = q_feat.float().contiguous()
    proj = projection.float().contiguous()
    # each sequence and head's key stabiliser: from its first key alone (positive_features' rule)
    shift = ((k[:, :, 0].float() * root) @ proj.T).amax(-1).reshape(B * Hk).contiguous()
    block_d = pow2(D)
    ft = max(MIN_ROWS, min(feature_tile, triton.next_power_of_2(M)))
    mt = triton.cdiv(M, ft)
    nseg = max(1, min(R, triton.cdiv(TARGET_PROGRAMS, B * Hk * mt)))
    seg_blocks = triton.cdiv(R, nseg)
    nseg = triton.cdiv(R, seg_blocks)
    grid = (B * Hk, nseg, mt)
    common = dict(BS=block_size, FT=ft, MT=mt, BLOCK_D=block_d, HK=Hk, NSEG=nseg, PREC=FEATURE_PRECISION,
                  num_warps=8 if block_size * block_d > 64 * 64 else 4,
                  num_stages=1)  # fp32 tf32x3 operands: pipelined copies would pass 228 KB of shared memory (H100)
    strides = (*k.stride(), *v.stride(), *position_values.stride())
    state = torch.empty(B * Hk, nseg, mt, 2, ft, block_d, device=k.device, dtype=torch.float32)
    norm = torch.empty(B * Hk, nseg, mt, ft, device=k.device, dtype=torch.float32)
    _segment_state[grid](k, v, position_values, proj, shift, state, norm, T, M, D, seg_blocks, root, *strides, **common)
    state0 = (state.cumsum(1) - state).contiguous()  # exclusive prefix over segments
    norm0 = (norm.cumsum(1) - norm).contiguous()
    part = torch.empty(mt, B, H, R, 2 * D + 1, device=k.device, dtype=torch.float32)
    G = H // Hk
    _block_rows[grid](qf, k, v, position_values, proj, shift, state0, norm0, part, T, M, D, R, seg_blocks, root,
                      *qf.stride()[:3], *strides, G=G, GP=pow2(G), H=H, **common)
    total = part.sum(0)  # the feature slices' sums
    return total[..., : 2 * D] / total[..., 2 * D :].clamp_min(1e-30)


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
    if q_feat.shape[2] != triton.cdiv(k.shape[2], block_size):  # the kernel writes one row per key block
        raise ValueError(f"q_feat has {q_feat.shape[2]} block rows; {k.shape[2]} keys in blocks of {block_size} "
                         f"make {triton.cdiv(k.shape[2], block_size)}")
    return _BlockRowsEstimate.apply(q_feat, k, v, position_values, projection, float(scale), int(block_size))
