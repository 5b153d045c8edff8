"""The decode step's block selection in Triton (decode_select_blocks): the query block's pooled estimate
-> key block scores -> grouped top-k -> sorted lists.

Contract: `kernels.reference_decode_step` (same signature, same outputs; the reference is the math
the prefill runs, so decoding on these kernels continues a prefill as a full re-run would).
Decoding one token is launch-bound: each kernel is one program per sequence (or per KV head, query
head, block of channels) that keeps its rows in registers. A step's ops, one module each:
kernels.decode_step_rows, decode_step_cnn, decode_step_select, sparse_decode, decode_step_mix.

Two kernels of one program per (sequence, KV head). The first spreads the query block's pooled
estimate over the key blocks (NKB of them: the whole position table, fixed shapes) as
order-preserving int32 keys, finds the head's budget-th largest key t_h and keeps the keys above it
as candidates (ties counted). The grouped threshold is at least every t_h, so the second finds it
from all heads' candidates alone, then writes its head's sorted list with a prefix sum. Both
searches are ternary with the two counts packed in one reduction (21 block-wide sums, not 32
bisection passes). Measured on an H100 at 8 x 2049 blocks (128k context): 21.7 us for both kernels;
one program per sequence took 68 us, a radix select by four 256-bin tl.histogram passes 228 us.
Exact ties at the threshold go to the lowest (KV head, block) (torch.topk's order among equal
values is unspecified).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels.block_budget import BlockBudget

PACK16_MAX = 16384  # counts up to this fit two to an int32 (low field < 2^16, high field < 2^31)
INT32_MIN = tl.constexpr(-2147483648)
INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _thirds(lo, hi):
    """Two cut points splitting [lo, hi) into thirds (int64), and them as int32 compare values."""
    third = (hi - lo + 2) // 3
    m1 = lo + third
    m2 = lo + 2 * third
    return m1, m2, tl.minimum(m1, INT32_MAX).to(tl.int32), tl.minimum(m2, INT32_MAX).to(tl.int32)


@triton.jit
def _narrow(lo, hi, m1, m2, n1, n2, budget):
    """One ternary step of the threshold search: keep the third holding the largest t with
    #(key >= t) >= budget (counts n1, n2 at the cuts; cuts at or past hi count as too few)."""
    e1 = (m1 < hi) & (n1 >= budget)
    e2 = (m2 < hi) & (n2 >= budget)
    new_lo = tl.where(e2, m2, tl.where(e1, m1, lo))
    new_hi = tl.where(e2, hi, tl.where(e1, tl.minimum(m2, hi), tl.minimum(m1, hi)))
    return new_lo, new_hi


@triton.jit
def _count_at_cuts(key, c1, c2, WIDE: tl.constexpr):
    """#(key >= c1) and #(key >= c2) over all of key, in one reduction: both counts packed in one
    integer (16-bit fields, 32-bit ones when WIDE), so each search step pays a single block-wide sum."""
    if WIDE:
        packed = tl.sum(tl.reshape((key >= c1).to(tl.int64) + ((key >= c2).to(tl.int64) << 32), [key.numel]), 0)
        return packed & 0xFFFFFFFF, packed >> 32
    else:
        packed = tl.sum(tl.reshape((key >= c1).to(tl.int32) + ((key >= c2).to(tl.int32) << 16), [key.numel]), 0)
        return packed & 0xFFFF, packed >> 16


SEARCH_STEPS = tl.constexpr(21)  # ternary steps from 2^32 - 1 candidates to one: 3^21 > 2^32


@triton.jit
def _select_candidates_kernel(
    Probs, BlockSum, Length, CdfScratch, Keys, Cand, Thr, Ties, Step,
    density,
    HKV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NKB: tl.constexpr, NKBP: tl.constexpr,
    MAXB: tl.constexpr, MAXBP: tl.constexpr, BS: tl.constexpr, PER_HEAD: tl.constexpr, HAS_DENSITY: tl.constexpr,
    SINK: tl.constexpr, LOCAL: tl.constexpr, WIDE: tl.constexpr,
):
    """One KV head: its key block scores as order-preserving int32 keys (-> Keys), the budget-th
    largest of them t_h (ternary search), and its candidates: the keys above t_h (fewer than the budget,
    -> Cand) and how many equal t_h (-> Thr, Ties). The grouped threshold is at least every t_h, so
    the candidates hold every key the group can keep."""
    pid = tl.program_id(0)
    b = pid // HKV
    pos = tl.load(Length + b)
    n = pos + 1
    qb = pos // BS
    within = pos % BS
    kk = tl.arange(0, KP)
    k_ok = kk < K
    # the current query block's rows so far (reset when this row opens the block), their mean
    ptr = pid * K + kk
    block = tl.load(BlockSum + ptr, mask=k_ok, other=0.0)
    block = tl.where(within == 0, 0.0, block) + tl.load(Probs + ptr, mask=k_ok, other=0.0)
    tl.store(BlockSum + ptr, block, mask=k_ok)
    pooled = block / (within + 1).to(tl.float32)
    # mass before each bin edge: cdf[0] = 0, cdf[m] = pooled[0] + .. + pooled[m-1]; scratch for the gathers
    base = CdfScratch + pid * (2 * KP + 2)
    tl.store(base + 1 + kk, tl.cumsum(pooled, 0), mask=k_ok)
    tl.store(base + kk, tl.zeros([KP], tl.float32), mask=kk == 0)
    tl.store(base + KP + 1 + kk, pooled, mask=k_ok)
    tl.debug_barrier()

    # each key block's share: bins spread evenly over their keys (spread_bins_to_key_blocks)
    j = tl.arange(0, NKBP)
    nf = n.to(tl.float32)
    u0 = tl.minimum((j * BS).to(tl.float32) * K / nf, K * 1.0)
    u1 = tl.minimum(((j + 1) * BS).to(tl.float32) * K / nf, K * 1.0)
    lo0 = tl.minimum(tl.floor(u0).to(tl.int32), K - 1)
    lo1 = tl.minimum(tl.floor(u1).to(tl.int32), K - 1)
    f0 = tl.load(base + lo0) + (u0 - lo0) * tl.load(base + KP + 1 + lo0)
    f1 = tl.load(base + lo1) + (u1 - lo1) * tl.load(base + KP + 1 + lo1)
    score = f1 - f0

    # order-preserving int32 keys: forced (sink, local) blocks on top, future / padding at the bottom
    causal = (j <= qb) & (j < NKB)
    forced = causal & ((j < SINK) | (j > qb - LOCAL))
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(forced, INT32_MAX, key)
    key = tl.where(causal, key, INT32_MIN)
    tl.store(Keys + pid * NKBP + j, key)
    # BlockBudget.blocks (kernels/block_budget.py) is the rule, here in tl ops: qb is known only on the device
    if HAS_DENSITY:
        base = tl.ceil(density * (qb + 1).to(tl.float32)).to(tl.int32)
    else:
        base = PER_HEAD
    budget = tl.minimum(qb + 1, tl.maximum(base, SINK + LOCAL)) * HKV

    # the budget-th largest key of this head: the largest t with #(key >= t) >= budget
    lo = tl.full([], INT32_MIN + 1, tl.int64)
    hi = tl.full([], INT32_MAX, tl.int64) + 1
    for _ in range(SEARCH_STEPS):
        m1, m2, c1, c2 = _thirds(lo, hi)
        n1, n2 = _count_at_cuts(key, c1, c2, WIDE)
        lo, hi = _narrow(lo, hi, m1, m2, n1, n2, budget)
    t_h = lo.to(tl.int32)
    above = key > t_h  # fewer than the budget (<= MAXB, the host's bound on it)
    place = tl.cumsum(above.to(tl.int32), 0) - 1
    tl.store(Cand + pid * MAXB + place, key, mask=above & (place < MAXB))
    s = tl.arange(0, MAXBP)
    tl.store(Cand + pid * MAXB + s, tl.full([MAXBP], INT32_MIN, tl.int32),
             mask=(s >= tl.sum(above.to(tl.int32), 0)) & (s < MAXB))
    tl.store(Thr + pid, t_h)
    tl.store(Ties + pid, tl.sum((key == t_h).to(tl.int32), 0))
    if pid % HKV == 0:  # the row's position and budget for the second kernel (which moves Length on)
        tl.store(Step + b * 2, pos)
        tl.store(Step + b * 2 + 1, budget)


@triton.jit
def _select_lists_kernel(
    Keys, Cand, Thr, Ties, Step, Length, Index, Count, Kept,
    HKV: tl.constexpr, HKVP: tl.constexpr, NKBP: tl.constexpr, MAXB: tl.constexpr, MAXBP: tl.constexpr,
    BS: tl.constexpr, WIDE: tl.constexpr,
):
    """One KV head's sorted list. Every program of a sequence finds the same grouped threshold T
    (the budget-th largest key over all heads) from the heads' candidates, searching above the
    largest t_h; exact ties at T go to the lowest (KV head, block)."""
    pid = tl.program_id(0)
    b = pid // HKV
    hk = pid % HKV
    pos = tl.load(Step + b * 2)
    budget = tl.load(Step + b * 2 + 1)
    hh = tl.arange(0, HKVP)
    h_ok = hh < HKV
    s = tl.arange(0, MAXBP)
    cand = tl.load(Cand + (b * HKV + hh[:, None]) * MAXB + s[None, :], mask=h_ok[:, None] & (s < MAXB)[None, :],
                   other=INT32_MIN)
    thr = tl.load(Thr + b * HKV + hh, mask=h_ok, other=INT32_MIN)
    ties = tl.load(Ties + b * HKV + hh, mask=h_ok, other=0)
    # #(key >= t) over all heads, for t >= max t_h: the candidates >= t, plus head h's ties when t == t_h
    ties_capped = tl.minimum(ties, budget)  # same verdict (>= budget), bounded counts for the packing
    lo = tl.max(thr, 0).to(tl.int64)
    hi = tl.full([], INT32_MAX, tl.int64) + 1
    for _ in range(SEARCH_STEPS):
        m1, m2, c1, c2 = _thirds(lo, hi)
        n1, n2 = _count_at_cuts(cand, c1, c2, WIDE)
        n1 += tl.sum(tl.where(thr >= c1, ties_capped, 0), 0)
        n2 += tl.sum(tl.where(thr >= c2, ties_capped, 0), 0)
        lo, hi = _narrow(lo, hi, m1, m2, n1, n2, budget)
    threshold = lo.to(tl.int32)
    need = budget - tl.sum(tl.sum((cand > threshold).to(tl.int32), 1), 0)
    tie_heads = tl.sum((cand == threshold).to(tl.int32), 1) + tl.where(thr == threshold, ties, 0)
    ties_before = tl.sum(tl.where(hh < hk, tie_heads, 0), 0)

    j = tl.arange(0, NKBP)
    key = tl.load(Keys + pid * NKBP + j)
    tie = (key == threshold).to(tl.int32)
    tie_rank = tl.cumsum(tie, 0) - tie + ties_before
    take = (key > threshold) | ((tie > 0) & (tie_rank < need))
    # the sorted list: a chosen block's place is the count of chosen blocks before it
    take_i = take.to(tl.int32)
    place = tl.cumsum(take_i, 0) - 1
    count = tl.sum(take_i, 0)
    out = Index + pid * MAXB
    tl.store(out + place, j, mask=take)
    m = tl.arange(0, MAXBP)
    tl.store(out + m, tl.full([MAXBP], -1, tl.int32), mask=(m >= count) & (m < MAXB))
    tl.store(Count + pid, count)
    qb = pos // BS
    full = tl.sum((take & (j < qb)).to(tl.int64), 0)
    diag = tl.sum((take & (j == qb)).to(tl.int64), 0)
    tl.store(Kept + pid, full * BS + diag * (pos % BS + 1))
    if hk == 0:
        tl.store(Length + b, pos + 1)


@torch.compiler.disable
def decode_select_blocks(
    probs: torch.Tensor, block_sum: torch.Tensor, length: torch.Tensor, block_size: int, num_key_blocks: int,
    budget: BlockBudget, max_budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hkv, K = probs.shape
    if not (block_sum.is_contiguous() and length.is_contiguous()):
        raise ValueError("decode_select_blocks: block_sum and length must be contiguous (they are updated in place)")
    maxb = min(num_key_blocks, max_budget)
    HKVP, KP = triton.next_power_of_2(Hkv), triton.next_power_of_2(K)
    nkbp, maxbp = triton.next_power_of_2(num_key_blocks), triton.next_power_of_2(maxb)
    dev = probs.device
    index = torch.empty(B, Hkv, maxb, dtype=torch.int32, device=dev)
    count = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    kept = torch.empty(B, Hkv, dtype=torch.int64, device=dev)
    cdf = torch.empty(B * Hkv, 2 * KP + 2, dtype=torch.float32, device=dev)
    keys = torch.empty(B * Hkv, nkbp, dtype=torch.int32, device=dev)
    cand = torch.empty(B * Hkv, maxb, dtype=torch.int32, device=dev)
    thr = torch.empty(B * Hkv, dtype=torch.int32, device=dev)
    ties = torch.empty(B * Hkv, dtype=torch.int32, device=dev)
    step = torch.empty(B, 2, dtype=torch.int32, device=dev)
    _select_candidates_kernel[(B * Hkv,)](
        probs.contiguous(), block_sum, length, cdf, keys, cand, thr, ties, step,
        0.0 if budget.density is None else budget.density,
        HKV=Hkv, K=K, KP=KP, NKB=num_key_blocks, NKBP=nkbp, MAXB=maxb, MAXBP=maxbp, BS=block_size,
        PER_HEAD=budget.per_head or 0, HAS_DENSITY=budget.density is not None, SINK=budget.sink_blocks,
        LOCAL=budget.local_blocks,
        WIDE=nkbp > PACK16_MAX, num_warps=min(8, max(4, nkbp // 512)),
    )
    _select_lists_kernel[(B * Hkv,)](
        keys, cand, thr, ties, step, length, index, count, kept,
        HKV=Hkv, HKVP=HKVP, NKBP=nkbp, MAXB=maxb, MAXBP=maxbp, BS=block_size,
        WIDE=Hkv * (maxb + max_budget) > PACK16_MAX, num_warps=min(8, max(4, max(nkbp, HKVP * maxbp) // 512)),
    )
    return index, count, kept
