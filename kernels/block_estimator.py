"""The block-row estimator in Triton, from the raw keys and values (`sea.predictor_rows: block`).

Contract: `kernels.reference_block_rows.block_rows_estimate` (same signature, same output): causal linear
attention over the keys' positive random features with values [v, positions], read once per query block at
its first row. Laid out as chunked linear attention usually is, so that no program walks a chain of states:

1. `_key_features`: the keys' features, once (a (bs x d) @ (d x m) product per key block in tf32x3, about
   fp32's accuracy, which the features' exp needs), stored fp32, zero-padded to whole blocks and to a multiple
   of 8 features (77 -> 80 at d 128: a power of two, 128, would be 60% more to read in each pass).
2. `_segment_sums`: each segment (a run of whole key blocks) sums kf^T [v | p] and kf, per KV head, in
   parallel over segments and value tiles; v and the position table are read in place (no [v, p] copy).
3. `_exclusive_prefix`: each segment's starting state, the sum of the segments before it.
4. `_segment_rows`: each (KV head, segment, value tile) makes the rows of the segment's query blocks for all
   G query heads at once: qf @ state0, plus the keys inside the segment up to each row's first key through
   a masked (rows x keys) product, one key block at a time, as a flash-attention loop without the softmax.
   The loop carries only accumulators, so its loads pipeline.

(Two earlier forms walked each segment block by block, the state carried from block to block: 4.15 and
2.35 ms at 32k on an H100, against 1.2 ms for the two walks of `kernels.linear_attention` over precomputed
features; docs/benchmarks.md.)

Precision follows the consumer (`out_dtype`): fp32 keeps about fp32's accuracy (features in fp32, bf16x3 sums,
tf32 rows); a 16-bit consumer (the predictor's bf16 weights at inference, which round the estimate to bf16 at
once) gets the fast path: features stored bf16, every product one bf16 MMA with fp32 sums.

Backward: the position table's gradient in closed form (`position_table_grad`; the only input the predictor
trains); any other input's by autograd through the reference (exact, memory-hungry).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._interpreter_compat import BF16_DOT_WORKS
from kernels import reference_block_rows
from kernels.linear_attention import _grads_through
from kernels.tiles import pow2

# Launch settings from benchmarks/tune_block_estimator.py (H100, 32k and 128k, 32 query heads on 8 KV heads, d 128):
SEGMENT_ROWS = 64  # rows (query heads x query blocks) of a pass-2 program: the segment's length in blocks follows
VALUE_TILE = {"fast": 128, "fp32": 64}  # value columns per program: bf16 0.556 ms at 32k against 0.721 with 64; fp32 0.953 against 1.07
WARPS = 4  # 4 beat 8 in 6 of the 8 (path, tile, segment) settings timed
FEATURE_BLOCKS = 4  # key blocks per feature program: the projection is loaded once for them
PREFIX_TILE = 8192  # elements of a prefix program's tile (segments x columns)
FEATURE_PRECISION = "tf32x3"  # plain tf32 would put ~1e-3 relative error into w.x, then through exp


@triton.jit
def _key_features(K, PROJ, SHIFT, KF, T, M, D, NB, root,
                  skb, skh, skt, skd,
                  BS: tl.constexpr, MP: tl.constexpr, KS: tl.constexpr, BLOCK_D: tl.constexpr, HK: tl.constexpr,
                  BLOCKS: tl.constexpr, PREC: tl.constexpr, BF16_KEYS: tl.constexpr, BF16_DOT: tl.constexpr):
    """kf = exp(w.x - |x|^2/2 - c) + 1e-6 of BLOCKS key blocks (x = k sqrt(scale)), one projection load for
    them all; 0 past T and past M; stored in KF's dtype.

    w.x: bf16 keys are exact bf16 operands, so w split in two bf16 halves gives w.k to about fp32's accuracy in
    two bf16 products ("bf16x2", then times sqrt(scale)); other keys go through PREC (tf32x3)."""
    pid, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // HK, pid_bh % HK
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, MP)
    d_ok, m_ok = offs_d < D, offs_m < M
    projT = tl.load(PROJ + offs_m[None, :] * D + offs_d[:, None], mask=m_ok[None, :] & d_ok[:, None], other=0.0)
    shift = tl.load(SHIFT + pid_bh)
    kb = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh  # int64: k may pass 2^31 elements
    out = KF + pid_bh.to(tl.int64) * NB * BS * KS
    if BF16_KEYS:
        p_hi = projT.to(tl.bfloat16)
        p_lo = (projT - p_hi.to(tl.float32)).to(tl.bfloat16)
        if not BF16_DOT:  # the interpreter (kernels._interpreter_compat): the same bf16 values, fp32 products
            p_hi, p_lo = p_hi.to(tl.float32), p_lo.to(tl.float32)
    for blk in range(pid * BLOCKS, tl.minimum(NB, (pid + 1) * BLOCKS)):
        rows = blk * BS + tl.arange(0, BS)
        r_ok = rows < T
        kraw = tl.load(kb + rows[:, None] * skt + offs_d[None, :] * skd, mask=r_ok[:, None] & d_ok[None, :],
                       other=0.0)
        kx = kraw.to(tl.float32) * root
        if BF16_KEYS:
            if not BF16_DOT:
                kraw = kraw.to(tl.float32)
            wx = (tl.dot(kraw, p_hi) + tl.dot(kraw, p_lo)) * root
        else:
            wx = tl.dot(kx, projT, input_precision=PREC)
        half_sq = 0.5 * tl.sum(kx * kx, axis=1)
        kf = tl.where(r_ok[:, None] & m_ok[None, :], tl.exp(wx - half_sq[:, None] - shift) + 1e-6, 0.0)
        tl.store(out + rows[:, None] * KS + offs_m[None, :], kf.to(KF.dtype.element_ty), mask=(offs_m < KS)[None, :])


@triton.jit
def _value_tile(V, P, b, hk, rows, tile, T, D,
                svb, svh, svt, svd, spt, spd,
                BS: tl.constexpr, DT: tl.constexpr, HALF_TILES: tl.constexpr):
    """Rows `rows` of value tile `tile` (BS x DT, fp32): tiles [0, HALF_TILES) are v's columns, the rest the
    position table's; 0 past T and past D."""
    cols = (tile % HALF_TILES) * DT + tl.arange(0, DT)
    ok = (rows < T)[:, None] & (cols < D)[None, :]
    if tile < HALF_TILES:
        vb = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        vals = tl.load(vb + rows[:, None] * svt + cols[None, :] * svd, mask=ok, other=0.0).to(tl.float32)
    else:
        vals = tl.load(P + rows[:, None] * spt + cols[None, :] * spd, mask=ok, other=0.0).to(tl.float32)
    return vals


@triton.jit
def _segment_sums(KF, V, P, STATE, NORM, T, D, SEG_BLOCKS, NB,
                  svb, svh, svt, svd, spt, spd,
                  BS: tl.constexpr, MP: tl.constexpr, KS: tl.constexpr, DT: tl.constexpr, HALF_TILES: tl.constexpr,
                  HK: tl.constexpr, BF16_DOT: tl.constexpr, FAST: tl.constexpr):
    """Pass 1: each segment's own sums of kf^T [v | p] (this program's value tile) and of kf. FAST: kf is
    stored bf16 and multiplies the values rounded to bf16, one product (for a 16-bit consumer)."""
    pid_bh, seg, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = pid_bh // HK, pid_bh % HK
    offs_c = tl.arange(0, BS)
    offs_m = tl.arange(0, MP)
    kf_base = KF + pid_bh.to(tl.int64) * NB * BS * KS
    state = tl.zeros((MP, DT), dtype=tl.float32)
    norm = tl.zeros((MP,), dtype=tl.float32)
    for i in range(seg * SEG_BLOCKS, tl.minimum(NB, (seg + 1) * SEG_BLOCKS)):
        rows = i * BS + offs_c
        kf = tl.load(kf_base + rows[:, None] * KS + offs_m[None, :], mask=(offs_m < KS)[None, :], other=0.0)
        vals = _value_tile(V, P, b, hk, rows, tile, T, D, svb, svh, svt, svd, spt, spd, BS, DT, HALF_TILES)
        kft = tl.trans(kf)
        v_hi = vals.to(tl.bfloat16)
        if FAST:  # kf is bf16 already: one product
            if not BF16_DOT:
                kft, v_hi = kft.to(tl.float32), v_hi.to(tl.float32)
            state = tl.dot(kft, v_hi, state)
        else:
            # bf16 operands, each split in two (hi + lo, "bf16x3": about fp32's accuracy): tf32 has no MMA with
            # these operand layouts (kf^T and v both major along the keys), and the tf32 dot ran at half the
            # speed of pass 2's (0.82 against 0.37 ms at 32k, H100)
            k_hi = kft.to(tl.bfloat16)
            k_lo = (kft - k_hi.to(tl.float32)).to(tl.bfloat16)
            v_lo = (vals - v_hi.to(tl.float32)).to(tl.bfloat16)
            if not BF16_DOT:  # the interpreter: the same rounding, products in fp32 (kernels._interpreter_compat)
                k_hi, k_lo, v_hi, v_lo = k_hi.to(tl.float32), k_lo.to(tl.float32), v_hi.to(tl.float32), v_lo.to(tl.float32)
            state = tl.dot(k_hi, v_hi, state)
            state = tl.dot(k_lo, v_hi, state)
            state = tl.dot(k_hi, v_lo, state)
        norm += tl.sum(kf.to(tl.float32), axis=0)
    nseg = tl.num_programs(1)
    width = tl.num_programs(2) * DT
    slot = (pid_bh * nseg + seg).to(tl.int64)
    tl.store(STATE + slot * MP * width + offs_m[:, None] * width + tile * DT + tl.arange(0, DT)[None, :], state)
    if tile == 0:
        tl.store(NORM + slot * MP + offs_m, norm)


@triton.jit
def _exclusive_prefix(X, NSEG, WIDTH, NSEG_P: tl.constexpr, COLS: tl.constexpr):
    """In place over (groups, NSEG, WIDTH): each segment's entry becomes the sum of the segments before it. One
    tile of all segments x COLS columns per program, scanned at once (a loop over the segments, each load
    waiting on the last, took 0.33 ms at 128k on an H100)."""
    g, pid = tl.program_id(0), tl.program_id(1)
    segs = tl.arange(0, NSEG_P)
    cols = pid * COLS + tl.arange(0, COLS)
    at = X + g.to(tl.int64) * NSEG * WIDTH + segs[:, None] * WIDTH + cols[None, :]
    ok = (segs < NSEG)[:, None] & (cols < WIDTH)[None, :]
    x = tl.load(at, mask=ok, other=0.0)
    tl.store(at, tl.cumsum(x, 0) - x, mask=ok)


@triton.jit
def _segment_rows(QF, KF, V, P, STATE0, NORM0, OUT, T, M, D, R, SEG_BLOCKS, NB,
                  sqb, sqh, sqr, svb, svh, svt, svd, spt, spd, sob, soh, sor,
                  G: tl.constexpr, RP: tl.constexpr, BS: tl.constexpr, MP: tl.constexpr, KS: tl.constexpr,
                  DT: tl.constexpr, HALF_TILES: tl.constexpr, HK: tl.constexpr, BF16_DOT: tl.constexpr,
                  FAST: tl.constexpr):
    """Pass 2: the rows (query head g, block i) of this segment's query blocks; row i reads the state of the
    segments before plus the segment's keys up to row i's first key. Numerator / denominator per value tile,
    stored in OUT's dtype. FAST: the (rows x keys) products and their values in bf16 (kf is bf16 already)."""
    pid_bh, seg, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = pid_bh // HK, pid_bh % HK
    r = tl.arange(0, RP)
    g = r // SEG_BLOCKS
    blk = r % SEG_BLOCKS  # the row's block inside the segment
    i = seg * SEG_BLOCKS + blk
    row_ok = (g < G) & (i < R)
    head = (hk * G + g).to(tl.int64)
    offs_m = tl.arange(0, MP)
    offs_c = tl.arange(0, BS)
    qf = tl.load(QF + b.to(tl.int64) * sqb + head[:, None] * sqh + i[:, None] * sqr + offs_m[None, :],
                 mask=row_ok[:, None] & (offs_m < M)[None, :], other=0.0)
    nseg = tl.num_programs(1)
    width = tl.num_programs(2) * DT
    slot = (pid_bh * nseg + seg).to(tl.int64)
    state0 = tl.load(STATE0 + slot * MP * width + offs_m[:, None] * width + tile * DT + tl.arange(0, DT)[None, :])
    if FAST:  # qf rounded once, so that every product of a row (state, keys, denominator) sees the same weights
        qf = qf.to(tl.bfloat16).to(tl.float32)
    acc = tl.dot(qf, state0)
    den = tl.sum(qf * tl.load(NORM0 + slot * MP + offs_m)[None, :], axis=1)
    kf_base = KF + pid_bh.to(tl.int64) * NB * BS * KS
    first = seg * SEG_BLOCKS
    q_op = qf
    if FAST and BF16_DOT:
        q_op = qf.to(tl.bfloat16)  # exact: qf holds bf16 values
    for j in range(first, tl.minimum(NB, first + SEG_BLOCKS)):
        rows = j * BS + offs_c
        kf = tl.load(kf_base + rows[:, None] * KS + offs_m[None, :], mask=(offs_m < KS)[None, :], other=0.0)
        vals = _value_tile(V, P, b, hk, rows, tile, T, D, svb, svh, svt, svd, spt, spd, BS, DT, HALF_TILES)
        if FAST and not BF16_DOT:
            kf = kf.to(tl.float32)
        a = tl.dot(q_op, tl.trans(kf))  # (RP, BS)
        seen = (j < i)[:, None] | ((j == i)[:, None] & (offs_c == 0)[None, :])  # whole earlier blocks; own first key
        a = tl.where(seen, a, 0.0)
        if FAST:  # the denominator sums the weights as rounded for the numerator: a convex mix stays one
            a_op, v_op = a.to(tl.bfloat16), vals.to(tl.bfloat16)
            den += tl.sum(a_op.to(tl.float32), axis=1)
            if not BF16_DOT:
                a_op, v_op = a_op.to(tl.float32), v_op.to(tl.float32)
            acc = tl.dot(a_op, v_op, acc)
        else:
            den += tl.sum(a, axis=1)
            acc = tl.dot(a, vals, acc)
    cols = (tile % HALF_TILES) * DT + tl.arange(0, DT)
    out_cols = cols + (tile // HALF_TILES) * D  # v's columns first, then the positions'
    out = acc / tl.maximum(den, 1e-30)[:, None]
    tl.store(OUT + b.to(tl.int64) * sob + head[:, None] * soh + i[:, None] * sor + out_cols[None, :],
             out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (cols < D)[None, :])


def _layout(R: int, G: int, segment_rows: int) -> tuple[int, int]:
    """(key blocks per segment, segments): a segment's query blocks times the G heads fill segment_rows rows."""
    seg_blocks = max(1, min(R, segment_rows // G))
    return seg_blocks, triton.cdiv(R, seg_blocks)


def _forward(q_feat, k, v, position_values, projection, scale: float, block_size: int,
             segment_rows: int | None = None, value_tile: int | None = None, out_dtype: torch.dtype = torch.float32,
             warps: int | None = None, feature_blocks: int | None = None, feature_stages: int = 1) -> torch.Tensor:
    """The estimate in out_dtype. A 16-bit out_dtype (the predictor's weights at inference) takes the fast path:
    features stored bf16 and every product in bf16 with fp32 sums, errors below the output's own rounding
    (ESTIMATE_TOL_FAST in tests/test_triton_kernels.py). fp32 keeps about fp32's accuracy (bf16x3, tf32)."""
    B, H, R, M = q_feat.shape
    _, Hk, T, D = k.shape
    G = H // Hk
    fast = out_dtype in (torch.bfloat16, torch.float16)
    root = math.sqrt(scale)
    qf = q_feat.float().contiguous()
    proj = projection.float().contiguous()
    # each sequence and head's key stabiliser: from its first key alone (positive_features' rule)
    shift = ((k[:, :, 0].float() * root) @ proj.T).amax(-1).reshape(B * Hk).contiguous()
    mp, block_d = pow2(M), pow2(D)
    ks = triton.cdiv(M, 8) * 8  # kf's row: the features rounded up to 32 bytes, not to the tile's power of two
    dt = min(value_tile or VALUE_TILE["fast" if fast else "fp32"], block_d)
    half_tiles = triton.cdiv(D, dt)
    tiles = 2 * half_tiles
    seg_blocks, nseg = _layout(R, G, segment_rows or SEGMENT_ROWS)
    dev = k.device
    kf = torch.empty(B * Hk, R * block_size, ks, device=dev, dtype=torch.bfloat16 if fast else torch.float32)
    feature_blocks = feature_blocks or FEATURE_BLOCKS
    _key_features[(triton.cdiv(R, feature_blocks), B * Hk)](
        k, proj, shift, kf, T, M, D, R, root, *k.stride(), BS=block_size, MP=mp, KS=ks, BLOCK_D=block_d, HK=Hk,
        BLOCKS=feature_blocks, PREC=FEATURE_PRECISION, BF16_KEYS=k.dtype == torch.bfloat16, BF16_DOT=BF16_DOT_WORKS,
        num_warps=8 if block_size * block_d > 64 * 64 else 4,
        num_stages=feature_stages)  # fp32 keys, pipelined, passed the H100's 228 KB of shared memory (tf32x3 operands)
    state = torch.empty(B * Hk, nseg, mp, tiles * dt, device=dev, dtype=torch.float32)
    norm = torch.empty(B * Hk, nseg, mp, device=dev, dtype=torch.float32)
    value_strides = (*v.stride(), *position_values.stride())
    grid = (B * Hk, nseg, tiles)
    common = dict(BS=block_size, MP=mp, KS=ks, DT=dt, HALF_TILES=half_tiles, HK=Hk, BF16_DOT=BF16_DOT_WORKS, FAST=fast,
                  num_warps=warps or WARPS)
    _segment_sums[grid](kf, v, position_values, state, norm, T, D, seg_blocks, R, *value_strides, **common)
    nseg_p = pow2(nseg, 1)
    cols = max(16, PREFIX_TILE // nseg_p)
    for x in (state, norm):
        width = x[0, 0].numel()
        _exclusive_prefix[(B * Hk, triton.cdiv(width, cols))](x, nseg, width, NSEG_P=nseg_p, COLS=cols)
    out = torch.empty(B, H, R, 2 * D, device=dev, dtype=out_dtype)
    _segment_rows[grid](qf, kf, v, position_values, state, norm, out, T, M, D, R, seg_blocks, R,
                        *qf.stride()[:3], *value_strides, *out.stride()[:3],
                        G=G, RP=pow2(G * seg_blocks), **common)
    return out


def position_table_grad(q_feat, k, position_values, projection, scale: float, block_size: int,
                        grad_out: torch.Tensor) -> torch.Tensor:
    """d loss / d position_values of block_rows_estimate, in closed form (the only input that learns in
    stage A: the predictor reads q, k, v detached and the projection is fixed).

    The positional half of row i is (qf_i . sum_{s <= i bs} kf_s p_s) / den_i, linear in p. So key s of block j
    gets kf_s . W, with W the sum over the rows that read s of qf_i (x) g_i / den_i: the rows of the blocks after
    j, and row j itself for its block's first key. Summed over batch and KV heads. Memory: one (M x d) state per
    (sequence, KV head, block), never the (B, Hkv, T, 2d) values and chunk states that autograd through the
    reference keeps."""
    B, H, R, M = q_feat.shape
    _, Hk, T, D = k.shape
    G, bs = H // Hk, block_size
    kf = reference_block_rows.positive_features(k.float() * math.sqrt(scale), projection.float(), is_query=False)
    kf = torch.nn.functional.pad(kf, (0, 0, 0, R * bs - T)).view(B, Hk, R, bs, M)  # pad keys: zero features
    first = kf[:, :, :, 0]  # (B, Hk, R, M): each block's first key
    block_sums = kf.sum(3)
    z = block_sums.cumsum(2) - block_sums + first  # the features' sum over the keys each block row reads
    qf = q_feat.float().view(B, Hk, G, R, M)
    den = (qf * z[:, :, None]).sum(-1).clamp_min(1e-30)  # (B, Hk, G, R), as the forward's
    u = grad_out[..., D:].float().view(B, Hk, G, R, D) / den[..., None]
    U = torch.einsum("bkgrm,bkgrd->bkrmd", qf, u)  # (B, Hk, R, M, D)
    later = U.flip(2).cumsum(2).flip(2) - U  # rows of the blocks after each block
    grad = kf @ later  # (B, Hk, R, bs, D)
    grad[:, :, :, 0] += (first[..., None, :] @ U).squeeze(-2)
    out = torch.zeros_like(position_values, dtype=torch.float32)
    out[:T] = grad.sum((0, 1)).reshape(R * bs, D)[:T]
    return out.to(position_values.dtype)


class _BlockRowsEstimate(torch.autograd.Function):
    """Forward in Triton. Backward: the position table's gradient in closed form (`position_table_grad`); the
    other inputs' (never asked for by the predictor) by autograd through the reference."""

    @staticmethod
    def forward(ctx, q_feat, k, v, position_values, projection, scale, block_size, out_dtype):
        ctx.save_for_backward(q_feat, k, v, position_values, projection)
        ctx.scale, ctx.block_size = scale, block_size
        return _forward(q_feat, k, v, position_values, projection, scale, block_size, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q_feat, k, v, table, projection = ctx.saved_tensors
        if not any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4)):
            grad_table = position_table_grad(q_feat, k, table, projection, ctx.scale, ctx.block_size, grad_out)
            return None, None, None, grad_table, None, None, None, None

        def op(*x):
            return reference_block_rows.block_rows_estimate(*x, ctx.scale, ctx.block_size)

        return (*_grads_through(op, ctx.saved_tensors, grad_out.float()), None, None, None)


@torch.compiler.disable  # inductor's own compile of an earlier form failed on the H100 (2026-12-06); eager launch
def block_rows_estimate(q_feat: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_values: torch.Tensor,
                        projection: torch.Tensor, scale: float, block_size: int,
                        out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if block_size not in (16, 32, 64, 128):  # one key block is one tile, as in the block-sparse kernel
        raise ValueError(f"block_size must be 16, 32, 64 or 128, got {block_size}")
    if position_values.shape[0] < k.shape[2]:
        raise ValueError(f"position table of {position_values.shape[0]} rows is shorter than the {k.shape[2]} keys")
    if q_feat.shape[2] != triton.cdiv(k.shape[2], block_size):  # the kernels write one row per key block
        raise ValueError(f"q_feat has {q_feat.shape[2]} block rows; {k.shape[2]} keys in blocks of {block_size} "
                         f"make {triton.cdiv(k.shape[2], block_size)}")
    return _BlockRowsEstimate.apply(q_feat, k, v, position_values, projection, float(scale), int(block_size), out_dtype)
