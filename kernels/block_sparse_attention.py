"""Block-sparse causal flash attention in Triton, forward and backward, with native GQA.

Contract: `kernels.reference_block_sparse.block_sparse_attention` (same signature, same outputs).

Layout of the work
- Forward and dq: grid (query block, batch x KV head x head chunk). A program stacks the rows of
  HPP query heads of one KV head (HPP * block_size rows, head-major) and walks the query block's
  key-block list once, so each K/V block is loaded once for all stacked heads. HPP is the
  largest power of two <= next_pow2(G) with HPP * block_size <= MAX_ROWS (128): the whole group
  in one program when it fits (block 32 with G <= 4, block 16 with G <= 8); with block 64, two
  heads per program (128-row tiles, the natural M of the tensor-core tiles), so G=4 takes two
  programs per group and G=3 two with one masked padding head. Stacking a whole large group
  would give 256-512-row fp32 accumulators that spill registers (ptxas for sm_90 already
  reports spills at 128 rows x d=128 with 4 warps), hence the cap; MAX_ROWS = block_size gives
  per-head programs. `benchmarks/tune_block_sparse.py` times the forward's alternatives (the row cap, two key
  blocks per step, key tiles as stored, the list in registers, warps, stages: FORWARD_LAUNCH).
- Online softmax in fp32 in base 2 (scale * log2 e folded into the scores); the row
  log-sum-exp is saved in natural log, fp32. A row with no key gives out 0, lse -inf.
- Backward, flash-attention-2 style: a preprocess computes delta = rowsum(dO * O); a dk/dv
  kernel per (key block, batch x KV head) walks the reverse lists (which query blocks list this
  key block, built by `reverse_block_index`) and, inside, every head chunk of the group, so dk/dv
  come out in KV-head shape; a key block listed by more than REV_CHUNK query blocks (the sink block is listed
  by all) is split over several programs that add atomically in fp32; a dq kernel per (query block, ..., head chunk)
  walks the forward lists. In dk/dv the stacking only sets the Q/dO tile shape (K/V are loaded
  once per program whatever it is), so it has its own, smaller cap DKDV_MAX_ROWS. All
  accumulation is fp32; results are cast to the input dtype.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)

# Row caps of a stacked tile (heads x block rows); see the module docstring. Tune on the GPU.
MAX_ROWS = 128  # forward and dq: stacking saves K/V loads
DKDV_MAX_ROWS = 64  # dk/dv: K/V stay resident anyway; smaller Q/dO tiles keep shared memory low
REV_CHUNK = 16  # dk/dv: query blocks per program; a key block listed by more is split over programs
# dk/dv launch: the backward took 11.42 ms at 32k with 4 warps and 2 stages against 17.21 with 8 and 2 (H200, bf16,
# 32 query heads on 8 KV heads, d 128, 2,048 keys per query; tune_block_sparse.py --backward)
DKDV_LAUNCH = {"num_warps": 4, "num_stages": 2}
LOG2E = 1.4426950408889634




def heads_per_program(G: int, block: int, max_rows: int) -> int:
    """How many query heads of a group one tile stacks (a power of two, >= 1)."""
    hpp = triton.next_power_of_2(G)
    while hpp > 1 and hpp * block > max_rows:
        hpp //= 2
    return hpp


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (tf32 would lose ~1e-3 relative); 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_warps(tile_elems: int) -> int:
    # 4 warps spill registers above a 64 x 64 fp32 tile per kernel accumulator (ptxas, sm_90); the forward overrides
    # this for 64-row tiles, which ran twice as fast on 4 warps (_forward_meta)
    return 8 if tile_elems > 64 * 64 else 4


@triton.jit
def _stacked_rows(i, hc, T, G: tl.constexpr, HPP: tl.constexpr, BLOCK: tl.constexpr):
    """Rows of a stacked tile: (head within the group, query position, row valid)."""
    r = tl.arange(0, HPP * BLOCK)
    g = hc * HPP + r // BLOCK
    t = i * BLOCK + r % BLOCK
    return g, t, (g < G) & (t < T)


@triton.jit
def _running_mean(t, i, b, hk, v_base, svt, svd, VPrefix, spb, sph, spq, spd, T,
                  BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    """The running mean of v at rows t of query block i (one KV head's): the blocks before the row's (VPrefix)
    plus the block's rows up to t, one lower-triangular product over the block's values."""
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    rows = i * BLOCK + tl.arange(0, BLOCK)
    vd = tl.load(v_base + rows[:, None] * svt + dcol[None, :] * svd, mask=(rows < T)[:, None] & dmask[None, :], other=0.0)
    lower = tl.where(rows[None, :] <= t[:, None], 1.0, 0.0).to(vd.dtype)  # exact in any dtype
    before = tl.load(VPrefix + b.to(tl.int64) * spb + hk.to(tl.int64) * sph + i * spq + dcol * spd, mask=dmask, other=0.0)
    return (tl.dot(lower, vd, input_precision=PREC) + before[None, :]) / (t + 1).to(tl.float32)[:, None]


@triton.jit
def _mix(out, mean_v, kept, t, row_ok, i, b, head, Gates, sgb, sgh, sgq, sgk):
    """mix_gated on a tile: u = 1 - kept / (t + 1); out * (1 - w)(1 + (2 sigmoid(s0) - 1) u) + w * mean_v with
    w = sigmoid(s1) u, the gates of each row's head for query block i."""
    g = Gates + b.to(tl.int64) * sgb + head * sgh + i * sgq
    s0 = tl.load(g, mask=row_ok, other=0.0)
    s1 = tl.load(g + sgk, mask=row_ok, other=0.0)
    u = tl.maximum(1.0 - kept / (t + 1).to(tl.float32), 0.0)
    w = tl.sigmoid(s1) * u
    keep = (1.0 - w) * (1.0 + (2.0 * tl.sigmoid(s0) - 1.0) * u)
    return keep[:, None] * out + w[:, None] * mean_v


@triton.jit
def _kept_keys(BlockIndex, n, t, i, BLOCK: tl.constexpr, MAXB: tl.constexpr, sij):
    """The keys each row t of query block i attended, from its list alone (BlockIndex at the list, n entries):
    whole blocks before the row's, and the diagonal block up to the row."""
    listed = tl.load(BlockIndex + tl.arange(0, MAXB) * sij, mask=tl.arange(0, MAXB) < n, other=-1)
    full_blocks = tl.sum(((listed >= 0) & (listed < i)).to(tl.int32), 0)
    diagonal = tl.sum((listed == i).to(tl.int32), 0)
    return (full_blocks * BLOCK + diagonal * (t - i * BLOCK + 1)).to(tl.float32)


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, BlockIndex, BlockCount, Gates, VPrefix,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    sib, sih, siq, sij,
    scb, sch, scq,
    sgb, sgh, sgq, sgk,
    spb, sph, spq, spd,
    Hkv, T, qk_scale,
    G: tl.constexpr, HPP: tl.constexpr, NHC: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, GATED: tl.constexpr, KPS: tl.constexpr,
    MAXB: tl.constexpr, K_ROWS: tl.constexpr, LIST_IN_REGS: tl.constexpr,
):
    """KPS key blocks per step of the list (1 or 2): two make (rows x 2 block) score tiles, fewer softmax
    rescales and wider MMAs, a list of odd length masking its last step's second half. MAXB: the lists' width
    as a power of two (GATED reads a whole list at once). K_ROWS: load a key tile as (keys, d) and transpose it
    on chip, or (0) load it transposed. LIST_IN_REGS: read the query block's list once into registers, or (0) one
    entry a step. Both are tuning candidates with the same products."""
    i = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first: better tail balance
    pid = tl.program_id(1)
    hc = pid % NHC
    b = (pid // NHC) // Hkv
    hk = (pid // NHC) % Hkv
    g, t, row_ok = _stacked_rows(i, hc, T, G, HPP, BLOCK)
    head = (hk * G + g).to(tl.int64)
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    cols = tl.arange(0, KPS * BLOCK)
    half = cols // BLOCK  # which of the step's key blocks a column is in

    q = tl.load(Q + b.to(tl.int64) * sqb + head[:, None] * sqh + t[:, None] * sqt + dcol[None, :] * sqd,
                mask=row_ok[:, None] & dmask[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh

    m_i = tl.full([HPP * BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([HPP * BLOCK], tl.float32)
    acc = tl.zeros([HPP * BLOCK, BLOCK_D], tl.float32)
    n = tl.load(BlockCount + b * scb + hk * sch + i * scq)
    idx = BlockIndex + b * sib + hk * sih + i * siq
    slots = tl.arange(0, MAXB)
    if LIST_IN_REGS:  # the whole list up front: a step's key addresses then wait on no load of their own
        held = tl.load(idx + slots * sij, mask=slots < n, other=0)
    for jj in range(0, n, KPS):
        if LIST_IN_REGS:
            kb = tl.sum(tl.where(slots == jj, held, 0), 0)
        else:
            kb = tl.load(idx + jj * sij)
        if KPS == 1:
            kpos = kb * BLOCK + cols
            listed = cols >= 0
        else:
            second = jj + 1 < n
            if LIST_IN_REGS:
                kb2 = tl.sum(tl.where(slots == jj + 1, held, 0), 0)
            else:
                kb2 = tl.load(idx + (jj + 1) * sij, mask=second, other=0)
            kpos = tl.where(half == 0, kb, kb2) * BLOCK + cols % BLOCK
            listed = (half == 0) | second
        if K_ROWS:  # the key block as stored (rows of d), transposed on chip: the tutorial's pattern
            kt = tl.trans(tl.load(k_base + kpos[:, None] * skt + dcol[None, :] * skd,
                                  mask=((kpos < T) & listed)[:, None] & dmask[None, :], other=0.0))
        else:
            kt = tl.load(k_base + kpos[None, :] * skt + dcol[:, None] * skd,
                         mask=dmask[:, None] & ((kpos < T) & listed)[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        # row_ok and kpos <= t < T also drop keys past T
        allowed = row_ok[:, None] & (kpos[None, :] <= t[:, None]) & listed[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: avoid -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kpos[:, None] * svt + dcol[None, :] * svd, mask=((kpos < T) & listed)[:, None] & dmask[None, :],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    if GATED:  # the output gates (kernels.reference_gates.mix_gated) with the query block's gates
        kept = _kept_keys(idx, n, t, i, BLOCK, MAXB, sij)
        mean_v = _running_mean(t, i, b, hk, v_base, svt, svd, VPrefix, spb, sph, spq, spd, T, BLOCK, BLOCK_D, D, PREC)
        out = _mix(out, mean_v, kept, t, row_ok, i, b, head, Gates, sgb, sgh, sgq, sgk)
    tl.store(Out + b.to(tl.int64) * sob + head[:, None] * soh + t[:, None] * sot + dcol[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
    tl.store(Lse + ((b * Hkv * G).to(tl.int64) + head) * T + t, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess(
    Out, DOut, Delta,
    sob, soh, sot, sod,
    sdb, sdh, sdt, sdd,
    Hq, T,
    BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    dcol = tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (dcol < D)[None, :]
    o = tl.load(Out + b * sob + h * soh + t[:, None] * sot + dcol[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DOut + b * sdb + h * sdh + t[:, None] * sdt + dcol[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * T + t, delta, mask=t < T)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, RevIndex, RevCount,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    sgkb, sgkh, sgkt, sgkd,
    sgvb, sgvh, sgvt, sgvd,
    sib, sih, siq, sij,
    scb, sch, scq,
    Hkv, T, qk_scale, scale, SPLITS,
    G: tl.constexpr, HPP: tl.constexpr, NHC: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, CHUNK: tl.constexpr,
):
    """Key block j's dk, dv over chunk c of the query blocks that list it (CHUNK of them). A list that fits one
    chunk is stored by its chunk-0 program; a longer one (the sink block, listed by every query block) is
    spread over several programs that add into DK/DV (fp32, zeroed) atomically: one program walking all 512
    query blocks of a 32k sink block was the kernel's critical path (13.7 ms against 3.1 for dq, H100)."""
    j = tl.program_id(0) // SPLITS
    c = tl.program_id(0) % SPLITS
    b = tl.program_id(1) // Hkv
    hk = tl.program_id(1) % Hkv
    kpos = j * BLOCK + tl.arange(0, BLOCK)
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    kv_mask = (kpos < T)[:, None] & dmask[None, :]
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    k = tl.load(K + b64 * skb + hk64 * skh + kpos[:, None] * skt + dcol[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * svb + hk64 * svh + kpos[:, None] * svt + dcol[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    q_base = Q + b64 * sqb
    do_base = DOut + b64 * sdb
    row_base = b64 * Hkv * G

    n = tl.load(RevCount + b * scb + hk * sch + j * scq)
    idx = RevIndex + b * sib + hk * sih + j * siq
    first = c * CHUNK
    # one flat loop over (listed query block, head chunk) pairs: a single loop is what the
    # compiler software-pipelines
    for it in range(first * NHC, tl.minimum(n, first + CHUNK) * NHC):
        i = tl.load(idx + (it // NHC) * sij)
        g, t, row_ok = _stacked_rows(i, it % NHC, T, G, HPP, BLOCK)
        head = (hk * G + g).to(tl.int64)
        qt = tl.load(q_base + head[None, :] * sqh + t[None, :] * sqt + dcol[:, None] * sqd,
                     mask=dmask[:, None] & row_ok[None, :], other=0.0)
        do = tl.load(do_base + head[:, None] * sdh + t[:, None] * sdt + dcol[None, :] * sdd,
                     mask=row_ok[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(Lse + (row_base + head) * T + t, mask=row_ok, other=0.0)
        delta = tl.load(Delta + (row_base + head) * T + t, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634  # keyless rows: all p are 0
        st = tl.dot(k, qt, input_precision=PREC) * qk_scale  # (keys, rows), log2 units
        st = tl.where(row_ok[None, :] & (kpos[:, None] <= t[None, :]), st, float("-inf"))
        pt = tl.exp2(st - lse2[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PREC)

    dk_off = b64 * sgkb + hk64 * sgkh + kpos[:, None] * sgkt + dcol[None, :] * sgkd
    dv_off = b64 * sgvb + hk64 * sgvh + kpos[:, None] * sgvt + dcol[None, :] * sgvd
    if n <= CHUNK:
        alone = kv_mask & (c == 0)
        tl.store(DK + dk_off, dk * scale, mask=alone)
        tl.store(DV + dv_off, dv, mask=alone)
    else:
        shared = kv_mask & (first < n)
        tl.atomic_add(DK + dk_off, dk * scale, mask=shared)
        tl.atomic_add(DV + dv_off, dv, mask=shared)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, BlockIndex, BlockCount,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    sgb, sgh, sgt, sgd,
    sib, sih, siq, sij,
    scb, sch, scq,
    Hkv, T, qk_scale, scale,
    G: tl.constexpr, HPP: tl.constexpr, NHC: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    i = tl.num_programs(0) - 1 - tl.program_id(0)
    pid = tl.program_id(1)
    hc = pid % NHC
    b = (pid // NHC) // Hkv
    hk = (pid // NHC) % Hkv
    g, t, row_ok = _stacked_rows(i, hc, T, G, HPP, BLOCK)
    head = (hk * G + g).to(tl.int64)
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    cols = tl.arange(0, BLOCK)
    rmask = row_ok[:, None] & dmask[None, :]
    q_off = b.to(tl.int64) * sqb + head[:, None] * sqh + t[:, None] * sqt + dcol[None, :] * sqd
    q = tl.load(Q + q_off, mask=rmask, other=0.0)
    do = tl.load(DOut + b.to(tl.int64) * sdb + head[:, None] * sdh + t[:, None] * sdt + dcol[None, :] * sdd,
                 mask=rmask, other=0.0)
    row = ((b * Hkv * G).to(tl.int64) + head) * T + t
    lse = tl.load(Lse + row, mask=row_ok, other=0.0)
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    dq = tl.zeros([HPP * BLOCK, BLOCK_D], tl.float32)

    n = tl.load(BlockCount + b * scb + hk * sch + i * scq)
    idx = BlockIndex + b * sib + hk * sih + i * siq
    for jj in range(0, n):
        kpos = tl.load(idx + jj * sij) * BLOCK + cols
        kvt_mask = dmask[:, None] & (kpos < T)[None, :]
        kt = tl.load(k_base + kpos[None, :] * skt + dcol[:, None] * skd, mask=kvt_mask, other=0.0)
        vt = tl.load(v_base + kpos[None, :] * svt + dcol[:, None] * svd, mask=kvt_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        s = tl.where(row_ok[:, None] & (kpos[None, :] <= t[:, None]), s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PREC)

    dq_off = b.to(tl.int64) * sgb + head[:, None] * sgh + t[:, None] * sgt + dcol[None, :] * sgd
    tl.store(DQ + dq_off, (dq * scale).to(DQ.dtype.element_ty), mask=rmask)


def reverse_block_index(block_index: torch.Tensor, block_count: torch.Tensor, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Transpose the lists: for each key block, the query blocks that list it (causally: i >= j).

    Returns (rev_index (B, Hkv, NKB, NQB) int32 sorted and -1 padded, rev_count (B, Hkv, NKB) int32).
    The width is NQB rather than the longest list, so no device-to-host sync is needed.
    """
    B, Hkv, nqb, maxb = block_index.shape
    idx = block_index.long()
    qb = torch.arange(nqb, device=idx.device).view(1, 1, nqb, 1)
    valid = (torch.arange(maxb, device=idx.device) < block_count.unsqueeze(-1)) & (idx >= 0) & (idx <= qb)
    dense = torch.zeros(B, Hkv, nqb, num_key_blocks + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, torch.where(valid, idx, num_key_blocks), True)
    chosen = dense[..., :num_key_blocks].transpose(-1, -2)  # (B, Hkv, NKB, NQB)
    rev = torch.where(chosen, torch.arange(nqb, device=idx.device), nqb).sort(-1).values
    rev = torch.where(rev == nqb, -1, rev)
    return rev.to(torch.int32), chosen.sum(-1).to(torch.int32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_size: int) -> None:
    B, Hq, T, d = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, d) or Hq % k.shape[1]:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"block_size must be 16, 32, 64 or 128, got {block_size}")
    if block_index.shape[:3] != (B, k.shape[1], triton.cdiv(T, block_size)):
        raise ValueError(f"block_index {tuple(block_index.shape)} does not match (B, Hkv, ceil(T/block_size))")


def _meta(G: int, block_size: int, d: int, max_rows: int, dtype: torch.dtype) -> dict:
    """Compile-time parameters and launch options shared by the kernels."""
    hpp = heads_per_program(G, block_size, max_rows)
    block_d = max(16, triton.next_power_of_2(d))
    return dict(G=G, HPP=hpp, NHC=triton.cdiv(G, hpp), BLOCK=block_size, D=d, BLOCK_D=block_d,
                PREC=_dot_precision(dtype), num_warps=_num_warps(hpp * block_size * block_d), num_stages=2)


# The forward's launch: KPS key blocks per step, and overrides of _meta's row cap, warps and stages. The
# defaults are what the benchmarks measured; benchmarks/tune_block_sparse.py times the alternatives.
FORWARD_LAUNCH = {"KPS": 1, "K_ROWS": 0, "LIST_IN_REGS": 0}
# The block rows' output gates: in the attention's epilogue (one kernel), or as a pass of their own over its
# output. The epilogue cost the forward 0.63 ms at 32k (3.41 against 2.76 ms without gates, H100,
# tune_block_sparse.py) where a pass over the bf16 output reads and writes ~0.5 GB.
GATES_IN_EPILOGUE = False


def _forward_meta(G: int, block_size: int, d: int, dtype: torch.dtype, launch: dict | None = None) -> dict:
    """_meta for the forward, with FORWARD_LAUNCH and then `launch` over it (max_rows, KPS, num_warps, num_stages)."""
    launch = {**FORWARD_LAUNCH, **(launch or {})}
    meta = _meta(G, block_size, d, launch.pop("max_rows", MAX_ROWS), dtype)
    if dtype != torch.float32 and block_size * meta["BLOCK_D"] <= 64 * 128:
        # 3 stages: 3.44 against 3.55 ms at 32k (bf16, d 128, blocks of 64, H100, tune_block_sparse.py); fp32 or
        # larger tiles would pass the 228 KB of shared memory
        meta["num_stages"] = 3
    if meta["HPP"] * block_size <= 64:
        # one warpgroup's 64 rows: 4 warps, 4.13 ms against 8.37 with 8 at 32k (H100, bf16, 40 heads on 40 KV heads
        # as LLaMA-13B, d 128, q/k/v in the model's layout; tune_block_sparse.py --heads 40 --kv-heads 40)
        meta["num_warps"] = 4
    meta.update(launch)
    return meta


def _forward(q, k, v, block_index, block_count, block_size: int, scale: float, gates: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None, launch: dict | None = None, gates_in_epilogue: bool | None = None):
    """gates (B, Hq, NQB, 2): apply the output gates in the epilogue; the output is then out_dtype (rounded once,
    from the fp32 tile). gates_in_epilogue (default GATES_IN_EPILOGUE) False: the attention first, in out_dtype,
    then `_gates_mix_kernel` over it in place."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    if gates is not None and not (GATES_IN_EPILOGUE if gates_in_epilogue is None else gates_in_epilogue):
        out, lse = _forward(q, k, v, block_index, block_count, block_size, scale, launch=launch, out_dtype=out_dtype)
        _gates_mix(out, v, block_index, block_count, block_size, gates)
        return out, lse
    meta = _forward_meta(Hq // Hkv, block_size, d, q.dtype, launch)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    gated = gates is not None
    # q's layout (a transposed view of (B, T, H, d) in a model): the model's transpose back is then free
    out = torch.empty_like(q, dtype=out_dtype or q.dtype)
    if not gated:
        gates = v_prefix = lse  # not read
        gate_strides = prefix_strides = (0, 0, 0, 0)
    else:
        v_prefix = block_prefix_sums(v, block_size)
        gate_strides, prefix_strides = gates.stride(), v_prefix.stride()
    _fwd_kernel[(triton.cdiv(T, block_size), B * Hkv * meta["NHC"])](
        q, k, v, out, lse, block_index, block_count, gates, v_prefix,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *block_index.stride(), *block_count.stride(), *gate_strides, *prefix_strides,
        Hkv, T, scale * LOG2E, GATED=gated, MAXB=triton.next_power_of_2(block_index.shape[-1]), **meta,
    )
    return out, lse


@triton.jit
def _gates_mix_kernel(
    Out, V, BlockIndex, BlockCount, Gates, VPrefix,
    sob, soh, sot, sod,
    svb, svh, svt, svd,
    sib, sih, siq, sij,
    scb, sch, scq,
    sgb, sgh, sgq, sgk,
    spb, sph, spq, spd,
    Hkv, T,
    G: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    MAXB: tl.constexpr,
):
    """The output gates over attention already written, in place: query block i of one KV head's G query heads.
    The kept counts and the running mean of v are the KV head's, made once for its G heads."""
    i = tl.program_id(0)
    b = tl.program_id(1) // Hkv
    hk = tl.program_id(1) % Hkv
    t = i * BLOCK + tl.arange(0, BLOCK)
    row_ok = t < T
    dcol = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dcol < D)[None, :]
    n = tl.load(BlockCount + b * scb + hk * sch + i * scq)
    kept = _kept_keys(BlockIndex + b * sib + hk * sih + i * siq, n, t, i, BLOCK, MAXB, sij)
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    mean_v = _running_mean(t, i, b, hk, v_base, svt, svd, VPrefix, spb, sph, spq, spd, T, BLOCK, BLOCK_D, D, PREC)
    for g in range(G):
        h = (hk * G + g).to(tl.int64)
        at = Out + b.to(tl.int64) * sob + h * soh + t[:, None] * sot + dcol[None, :] * sod
        out = tl.load(at, mask=mask, other=0.0).to(tl.float32)
        out = _mix(out, mean_v, kept, t, row_ok, i, b, tl.full([BLOCK], 0, tl.int64) + h, Gates, sgb, sgh, sgq, sgk)
        tl.store(at, out.to(Out.dtype.element_ty), mask=mask)


def _gates_mix(out, v, block_index, block_count, block_size: int, gates) -> None:
    B, Hq, T, d = out.shape
    v_prefix = block_prefix_sums(v, block_size)
    block_d = max(16, triton.next_power_of_2(d))
    Hkv = v.shape[1]
    _gates_mix_kernel[(triton.cdiv(T, block_size), B * Hkv)](
        out, v, block_index, block_count, gates, v_prefix, *out.stride(), *v.stride(), *block_index.stride(),
        *block_count.stride(), *gates.stride(), *v_prefix.stride(), Hkv, T,
        G=Hq // v.shape[1], BLOCK=block_size, D=d, BLOCK_D=block_d, PREC=_dot_precision(v.dtype),
        MAXB=triton.next_power_of_2(block_index.shape[-1]), num_warps=_num_warps(block_size * block_d),
    )


def block_prefix_sums(v: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, NQB, d) fp32: the sum of v over the blocks before each block."""
    B, H, T, d = v.shape
    full = T // block_size
    # summed in fp32 straight from v's dtype: no fp32 or padded copy of v (those were 0.25 ms at 32k, H100)
    sums = v[:, :, : full * block_size].unflatten(2, (full, block_size)).sum(3, dtype=torch.float32)
    if T % block_size:  # the partial last block
        sums = torch.cat([sums, v[:, :, full * block_size :].sum(2, keepdim=True, dtype=torch.float32)], dim=2)
    # scanned along the last dimension: torch's scan along an outer one runs a column per thread, each load
    # waiting on the last (0.19 ms at 32k and 0.76 ms at 128k on an H100, for 1 MiB and 4 MiB)
    sums = sums.transpose(2, 3).contiguous()
    return (sums.cumsum(3) - sums).transpose(2, 3)


def _backward(do, q, k, v, out, lse, block_index, block_count, block_size: int, scale: float,
              rev_chunk: int | None = None, dkdv_launch: dict | None = None):
    """rev_chunk: query blocks a dk/dv program walks at most (REV_CHUNK; tests pass small ones). dkdv_launch:
    max_rows, num_warps, num_stages of the dk/dv kernel (benchmarks/tune_block_sparse.py --backward)."""
    dkdv_launch = {**DKDV_LAUNCH, **(dkdv_launch or {})}
    rev_chunk = rev_chunk or REV_CHUNK
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    nb = triton.cdiv(T, block_size)
    delta = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    _bwd_preprocess[(nb, B * Hq)](
        out, do, delta, *out.stride(), *do.stride(), Hq, T, BLOCK=block_size, D=d, BLOCK_D=block_d,
        num_warps=_num_warps(block_size * block_d),
    )
    rev_index, rev_count = reverse_block_index(block_index, block_count, nb)
    dq = torch.empty_like(q)
    # fp32 and zeroed: a key block listed by more than rev_chunk query blocks is summed atomically
    dk, dv = (torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2))
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    meta = _meta(G, block_size, d, dkdv_launch.pop("max_rows", DKDV_MAX_ROWS), q.dtype)
    meta["num_warps"] = max(meta["num_warps"], _num_warps(2 * block_size * meta["BLOCK_D"]))  # dk and dv accumulators
    meta.update(dkdv_launch)
    splits = triton.cdiv(nb, rev_chunk)  # a bound on any list's chunks, known without a host sync
    _bwd_dkdv_kernel[(nb * splits, B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, rev_index, rev_count, *common, *dk.stride(), *dv.stride(),
        *rev_index.stride(), *rev_count.stride(), Hkv, T, scale * LOG2E, scale, splits, CHUNK=rev_chunk, **meta,
    )
    dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    meta = _meta(G, block_size, d, MAX_ROWS, q.dtype)
    _bwd_dq_kernel[(nb, B * Hkv * meta["NHC"])](
        q, k, v, do, lse, delta, dq, block_index, block_count, *common, *dq.stride(),
        *block_index.stride(), *block_count.stride(), Hkv, T, scale * LOG2E, scale, **meta,
    )
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_index, block_count, block_size: int, scale: float):
        out, lse = _forward(q, k, v, block_index, block_count, block_size, scale)
        ctx.save_for_backward(q, k, v, out, lse, block_index, block_count)
        ctx.block_size, ctx.scale = block_size, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, block_index, block_count = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, block_index, block_count, ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each query block over its listed key blocks (see the reference op).

    Returns (out (B, Hq, T, d) in q.dtype, row log-sum-exp (B, Hq, T) fp32, -inf for a row with
    no key; the lse carries no gradient). Differentiable in q, k, v.
    """
    _check(q, k, v, block_index, block_size)
    return _BlockSparseAttention.apply(
        q, k, v, block_index.to(torch.int32), block_count.to(torch.int32), int(block_size), float(scale)
    )


def block_sparse_attention_gated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor,
                                 block_count: torch.Tensor, block_size: int, scale: float, gates: torch.Tensor,
                                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """block_sparse_attention with the block rows' output gates in its epilogue (see the reference op in
    kernels.reference_block_rows): one kernel, (B, Hq, T, d) in out_dtype. Inference only (no autograd)."""
    _check(q, k, v, block_index, block_size)
    if gates.shape != (*q.shape[:2], block_index.shape[2], 2):
        raise ValueError(f"gates {tuple(gates.shape)} do not match (B, Hq, NQB, 2)")
    out, _ = _forward(q, k, v, block_index.to(torch.int32), block_count.to(torch.int32), int(block_size), float(scale),
                      gates.float(), out_dtype)
    return out
