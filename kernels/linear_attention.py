"""Triton causal linear attention: a sequential scan over chunks, the running state in registers.

Matches `reference_linear_attention.causal_linear_attention(q_feat, k_feat, v, chunk)`. The sequence is cut
into segments so that enough programs run at once: pass 1 sums each segment's state
(kf^T v, and kf) per KV head in parallel; a tiny prefix over segments gives each segment its
starting state; pass 2 has one program per (batch x query head, segment, tile of value
columns) walk its chunks: exact attention inside a chunk, plus the running state of all
earlier chunks. Only (segments x m x dv) states are stored, not the reference's
(chunks x m x dv). GQA: k_feat and v may have fewer heads than q_feat (query head h reads head
h // (H / Hkv)), so the estimator need not repeat them.

Backward recomputes through the reference (autograd), which is exact but memory-hungry:
training at long T is stage B's concern; inference and stage A's selection path are forward-only
here (stage A differentiates the estimator through the reference on CPU shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels import reference_block_rows, reference_linear_attention


@triton.jit
def _segment_state(
    KF, V, STATE, NORM,
    T, M, DV, SEG_LEN,
    skb, skh, skt, svb, svh, svt,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HK: tl.constexpr, NSEG: tl.constexpr,
):
    """Pass 1: each segment's own sum of kf^T v and of kf (per KV head), in parallel over segments."""
    pid_bh = tl.program_id(0)
    seg = tl.program_id(1)
    pid_dv = tl.program_id(2)
    b = pid_bh // HK
    hk = pid_bh % HK
    offs_c = tl.arange(0, CHUNK)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    dv_ok = offs_dv < DV
    k_base = KF + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    state = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    norm = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(seg * SEG_LEN, tl.minimum(T, (seg + 1) * SEG_LEN), CHUNK):
        rows = c0 + offs_c
        r_ok = rows < T
        kf = tl.load(k_base + rows[:, None] * skt + offs_m[None, :], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        vv = tl.load(v_base + rows[:, None] * svt + offs_dv[None, :], mask=r_ok[:, None] & dv_ok[None, :], other=0.0)
        state += tl.dot(tl.trans(kf), vv)
        norm += tl.sum(kf, axis=0)
    slot = pid_bh * NSEG + seg
    tl.store(STATE + slot * BLOCK_M * DV + offs_m[:, None] * DV + offs_dv[None, :], state, mask=dv_ok[None, :])
    if pid_dv == 0:
        tl.store(NORM + slot * BLOCK_M + offs_m, norm)


@triton.jit
def _linear_attention_fwd(
    QF, KF, V, OUT, STATE0, NORM0,
    T, M, DV, G, SEG_LEN,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, H: tl.constexpr, HK: tl.constexpr,
    NSEG: tl.constexpr,
):
    """Pass 2: each (head, segment) scans its chunks, starting from the sum of all earlier segments."""
    pid_bh = tl.program_id(0)
    seg = tl.program_id(1)
    pid_dv = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_c = tl.arange(0, CHUNK)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    dv_ok = offs_dv < DV
    q_base = QF + b * sqb + h * sqh
    k_base = KF + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    o_base = OUT + b * sob + h * soh
    slot = (b * HK + hk) * NSEG + seg
    state = tl.load(STATE0 + slot * BLOCK_M * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=dv_ok[None, :], other=0.0)
    norm = tl.load(NORM0 + slot * BLOCK_M + offs_m)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c0 in range(seg * SEG_LEN, tl.minimum(T, (seg + 1) * SEG_LEN), CHUNK):
        rows = c0 + offs_c
        r_ok = rows < T
        qf = tl.load(q_base + rows[:, None] * sqt + offs_m[None, :], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        kf = tl.load(k_base + rows[:, None] * skt + offs_m[None, :], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        vv = tl.load(v_base + rows[:, None] * svt + offs_dv[None, :], mask=r_ok[:, None] & dv_ok[None, :], other=0.0)
        a = tl.where(causal, tl.dot(qf, tl.trans(kf)), 0.0)
        num = tl.dot(a, vv) + tl.dot(qf, state)
        den = tl.sum(a, axis=1) + tl.sum(qf * norm[None, :], axis=1)
        out = num / tl.maximum(den, 1e-30)[:, None]
        tl.store(o_base + rows[:, None] * sot + offs_dv[None, :], out, mask=r_ok[:, None] & dv_ok[None, :])
        state += tl.dot(tl.trans(kf), vv)
        norm += tl.sum(kf, axis=0)


TARGET_PROGRAMS = 1024  # enough programs in flight to fill an H100 (132 SMs)


def _num_segments(num_chunks: int, base_programs: int, segments: int | None) -> int:
    if segments is not None:
        return max(1, min(segments, num_chunks))
    return max(1, min(num_chunks, triton.cdiv(TARGET_PROGRAMS, base_programs)))


def _forward(q_feat, k_feat, v, chunk: int, segments: int | None = None) -> torch.Tensor:
    B, H, T, M = q_feat.shape
    Hk, DV = k_feat.shape[1], v.shape[-1]
    qf, kf, vv = (x.float().contiguous() for x in (q_feat, k_feat, v))
    out = torch.empty(B, H, T, DV, device=q_feat.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2(M))
    block_dv = min(64, max(16, triton.next_power_of_2(DV)))
    chunk = max(16, min(64, triton.next_power_of_2(chunk)))
    dv_tiles = triton.cdiv(DV, block_dv)
    num_chunks = triton.cdiv(T, chunk)
    nseg = _num_segments(num_chunks, B * H * dv_tiles, segments)
    seg_len = triton.cdiv(num_chunks, nseg) * chunk
    nseg = triton.cdiv(T, seg_len)
    warps = 8 if block_m >= 128 else 4
    # pass 1: per-segment state sums (per KV head); then an exclusive prefix over segments (tiny)
    state = torch.empty(B * Hk * nseg, block_m, DV, device=q_feat.device, dtype=torch.float32)
    norm = torch.zeros(B * Hk * nseg, block_m, device=q_feat.device, dtype=torch.float32)
    _segment_state[(B * Hk, nseg, dv_tiles)](
        kf, vv, state, norm, T, M, DV, seg_len,
        kf.stride(0), kf.stride(1), kf.stride(2), vv.stride(0), vv.stride(1), vv.stride(2),
        CHUNK=chunk, BLOCK_M=block_m, BLOCK_DV=block_dv, HK=Hk, NSEG=nseg, num_warps=warps,
    )
    state = state.view(B * Hk, nseg, block_m, DV)
    norm = norm.view(B * Hk, nseg, block_m)
    state0 = (state.cumsum(1) - state).contiguous()
    norm0 = (norm.cumsum(1) - norm).contiguous()
    _linear_attention_fwd[(B * H, nseg, dv_tiles)](
        qf, kf, vv, out, state0, norm0, T, M, DV, H // Hk, seg_len,
        qf.stride(0), qf.stride(1), qf.stride(2), kf.stride(0), kf.stride(1), kf.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        CHUNK=chunk, BLOCK_M=block_m, BLOCK_DV=block_dv, H=H, HK=Hk, NSEG=nseg, num_warps=warps,
    )
    return out


class _LinearAttention(torch.autograd.Function):
    """Forward in Triton; backward by autograd through the reference. block_size 0: every row (chunk is the
    reference's chunk); block_size > 0: block rows. Plain tensor and int arguments, which torch.compile traces."""

    @staticmethod
    def forward(ctx, q_feat, k_feat, v, chunk, block_size):
        ctx.save_for_backward(q_feat, k_feat, v)
        ctx.chunk, ctx.block_size = chunk, block_size
        if block_size:
            return _block_forward(q_feat, k_feat, v, block_size)
        return _forward(q_feat, k_feat, v, chunk)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.block_size:
            op = lambda *x: reference_block_rows.block_linear_attention(*x, ctx.block_size)  # noqa: E731
        else:
            op = lambda *x: reference_linear_attention.causal_linear_attention(*x, chunk=ctx.chunk)  # noqa: E731
        return (*_grads_through(op, ctx.saved_tensors, grad_out), None, None)


def _grads_through(reference_op, inputs, grad_out) -> tuple:
    """The gradients of the inputs that need one, by autograd through the reference op (exact, memory-hungry)."""
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        out = reference_op(*inputs)
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
    return tuple(next(grads) if x.requires_grad else None for x in inputs)


def causal_linear_attention(q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    return _LinearAttention.apply(q_feat, k_feat, v, chunk, 0)


# ---------------------------------------------------------------------------
# the block-row estimator (sea.predictor_rows: block): the same state, read once per query block at its first row


@triton.jit
def _block_rows_fwd(
    QF, KF, V, OUT, STATE0, NORM0,
    T, M, DV, SEG_BLOCKS,
    sqb, sqh, sqr, skb, skh, skt, svb, svh, svt, sob, soh, sor,
    G: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    HK: tl.constexpr, NSEG: tl.constexpr,
):
    """Pass 2: each (KV head, segment) walks its key blocks from the sum of all earlier segments; block i's
    row (for the G query heads of the KV head at once) reads the state plus the block's first key, then the
    whole block joins the state."""
    pid_bh = tl.program_id(0)
    seg = tl.program_id(1)
    pid_dv = tl.program_id(2)
    b = pid_bh // HK
    hk = pid_bh % HK
    offs_g = tl.arange(0, GP)
    offs_c = tl.arange(0, BS)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    g_ok = offs_g < G
    m_ok = offs_m < M
    dv_ok = offs_dv < DV
    heads = hk * G + offs_g
    q_base = QF + b * sqb + heads * sqh
    k_base = KF + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    o_base = OUT + b * sob + heads * soh
    slot = pid_bh * NSEG + seg
    state = tl.load(STATE0 + slot * BLOCK_M * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=dv_ok[None, :], other=0.0)
    norm = tl.load(NORM0 + slot * BLOCK_M + offs_m)
    for i in range(seg * SEG_BLOCKS, tl.minimum(tl.cdiv(T, BS), (seg + 1) * SEG_BLOCKS)):
        first = i * BS
        qf = tl.load(q_base[:, None] + i * sqr + offs_m[None, :], mask=g_ok[:, None] & m_ok[None, :], other=0.0)
        kf0 = tl.load(k_base + first * skt + offs_m, mask=m_ok, other=0.0)
        v0 = tl.load(v_base + first * svt + offs_dv, mask=dv_ok, other=0.0)
        a0 = tl.sum(qf * kf0[None, :], axis=1)  # the first key's weight in each head's row
        num = tl.dot(qf, state) + a0[:, None] * v0[None, :]
        den = tl.sum(qf * norm[None, :], axis=1) + a0
        tl.store(o_base[:, None] + i * sor + offs_dv[None, :], num / tl.maximum(den, 1e-30)[:, None],
                 mask=g_ok[:, None] & dv_ok[None, :])
        rows = first + offs_c
        r_ok = rows < T
        kf = tl.load(k_base + rows[:, None] * skt + offs_m[None, :], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        vv = tl.load(v_base + rows[:, None] * svt + offs_dv[None, :], mask=r_ok[:, None] & dv_ok[None, :], other=0.0)
        state += tl.dot(tl.trans(kf), vv)
        norm += tl.sum(kf, axis=0)


def _block_forward(q_feat, k_feat, v, block_size: int, segments: int | None = None) -> torch.Tensor:
    B, H, R, M = q_feat.shape
    Hk, T, DV = k_feat.shape[1], k_feat.shape[2], v.shape[-1]
    qf, kf, vv = (x.float().contiguous() for x in (q_feat, k_feat, v))
    out = torch.empty(B, H, R, DV, device=q_feat.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2(M))
    block_dv = min(64, max(16, triton.next_power_of_2(DV)))
    dv_tiles = triton.cdiv(DV, block_dv)
    nseg = _num_segments(R, B * Hk * dv_tiles, segments)
    seg_blocks = triton.cdiv(R, nseg)
    nseg = triton.cdiv(R, seg_blocks)
    warps = 8 if block_m >= 128 else 4
    # pass 1 is the token rows' (segments of whole key blocks, one block per chunk)
    state = torch.empty(B * Hk * nseg, block_m, DV, device=q_feat.device, dtype=torch.float32)
    norm = torch.zeros(B * Hk * nseg, block_m, device=q_feat.device, dtype=torch.float32)
    _segment_state[(B * Hk, nseg, dv_tiles)](
        kf, vv, state, norm, T, M, DV, seg_blocks * block_size,
        kf.stride(0), kf.stride(1), kf.stride(2), vv.stride(0), vv.stride(1), vv.stride(2),
        CHUNK=block_size, BLOCK_M=block_m, BLOCK_DV=block_dv, HK=Hk, NSEG=nseg, num_warps=warps,
    )
    state = state.view(B * Hk, nseg, block_m, DV)
    norm = norm.view(B * Hk, nseg, block_m)
    state0 = (state.cumsum(1) - state).contiguous()
    norm0 = (norm.cumsum(1) - norm).contiguous()
    G = H // Hk
    _block_rows_fwd[(B * Hk, nseg, dv_tiles)](
        qf, kf, vv, out, state0, norm0, T, M, DV, seg_blocks,
        qf.stride(0), qf.stride(1), qf.stride(2), kf.stride(0), kf.stride(1), kf.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        G=G, GP=max(16, triton.next_power_of_2(G)), BS=block_size, BLOCK_M=block_m, BLOCK_DV=block_dv, HK=Hk,
        NSEG=nseg, num_warps=warps,
    )
    return out


def block_linear_attention(q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor, block_size: int,
                           chunk_blocks: int = 8) -> torch.Tensor:
    """reference_block_rows.block_linear_attention in two Triton passes (chunk_blocks is the reference's memory knob:
    here the segments are sized for the GPU). Backward recomputes through the reference."""
    if block_size not in (16, 32, 64, 128):  # as the block-sparse kernel: one key block is one tile
        raise ValueError(f"block_size must be 16, 32, 64 or 128, got {block_size}")
    return _LinearAttention.apply(q_feat, k_feat, v, 0, int(block_size))
