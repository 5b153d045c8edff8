"""Triton grouped top-k over key blocks: one program per (sequence, query block) makes every KV head's
sorted block list at once, on the device, with no host sync.

Matches `reference_select.select_key_blocks` (same signature) wherever no two candidate scores tie at the
budget's edge: the reference takes torch.topk's order among equal scores, this kernel the lowest
(head, block) first. Forced blocks (sink and local) are +inf, so they never tie with a real score and are
always kept (the budget is never below them). The budget's threshold is found by bisection on the
scores' bits (an order-preserving int32 view), 32 counting passes over the tile held in registers. A tile too
large for registers (many KV heads at long context: 40 heads x 2,048 key blocks for a LLaMA-13B at 128k) is walked
in chunks of heads instead, each pass reloading them from the cache (`_select_kernel_chunked`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels import reference_block_rows, reference_select
from kernels.block_budget import BlockBudget
from kernels.tiles import pow2


@triton.jit
def _ordered(x):
    """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _tile_keys(S, i, c, b, q, NKB, sink, local, ssb, ssh, ssq, ssk,
                HKV: tl.constexpr, HC: tl.constexpr, NKB_P: tl.constexpr):
    """Heads c .. c+HC-1 of query block q's scores: the candidates (causal, inside) and their order-preserving
    int32 keys (compared in int64 by the callers' bisection); the forced blocks (sink, local) at +inf, always kept."""
    h = c + tl.arange(0, HC)
    j = tl.arange(0, NKB_P)
    inside = (h < HKV)[:, None] & (j < NKB)[None, :]
    s = tl.load(S + b * ssb + h[:, None] * ssh + q * ssq + j[None, :] * ssk, mask=inside, other=float("-inf"))
    forced = ((j < sink) | ((j <= i) & (j > i - local))) & (j <= i) & (j < NKB)
    s = tl.where(forced[None, :] & inside, float("inf"), s)
    cand = inside & (s > float("-inf"))
    return cand, _ordered(s), h, j


@triton.jit
def _store_chosen(cand, key, lo, need, ties_before, h, j, Index, Count, b, q, MAXB, sib, sih, siq, sij, scb, sch, scq,
                  HKV: tl.constexpr):
    """Store heads h's chosen blocks: those above the threshold lo, and the first `need` ties at it in (head, block)
    order (ties_before: ties in earlier heads, which rank first), each head's list sorted by block. Returns the
    heads' ties, for the next chunk's ties_before."""
    above = cand & (key.to(tl.int64) > lo)
    tie = cand & (key.to(tl.int64) == lo)
    row_ties = tl.sum(tie.to(tl.int32), 1)
    rank = ties_before + tl.cumsum(row_ties, 0)[:, None] - row_ties[:, None] + tl.cumsum(tie.to(tl.int32), 1) - 1
    chosen = above | (tie & (rank < need))
    place = tl.cumsum(chosen.to(tl.int32), 1) - 1  # sorted by block index within each head
    tl.store(Index + b * sib + h[:, None] * sih + q * siq + place * sij, j[None, :] + 0 * place,
             mask=chosen & (place < MAXB))
    tl.store(Count + b * scb + h * sch + q * scq, tl.sum(chosen.to(tl.int32), 1), mask=h < HKV)
    return tl.sum(row_ties, 0)


@triton.jit
def _select_kernel(
    S, Blocks, BlockPos, Index, Count,
    NKB, sink, local, MAXB, MAX_BUDGET,
    ssb, ssh, ssq, ssk, spb, spq, sbb, sbq, sib, sih, siq, sij, scb, sch, scq,
    HKV: tl.constexpr, HP: tl.constexpr, NKB_P: tl.constexpr,
):
    q = tl.program_id(0)
    b = tl.program_id(1)
    i = tl.load(BlockPos + b * sbb + q * sbq)
    cand, key, h, j = _tile_keys(S, i, 0, b, q, NKB, sink, local, ssb, ssh, ssq, ssk, HKV, HP, NKB_P)
    budget = tl.load(Blocks + b * spb + q * spq) * HKV  # BlockBudget.blocks of query block i, from the host
    take = tl.minimum(tl.minimum(budget, MAX_BUDGET), tl.sum(tl.sum(cand.to(tl.int32), 1), 0))  # as the reference's top-k
    # the largest t with count(key >= t) >= take: bisection over the int32 range (in int64, no overflow)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483648, tl.int64)  # count(key >= hi) = 0 < take (take >= 1 when any candidate)
    for _ in range(33):
        mid = (lo + hi) // 2
        n = tl.sum(tl.sum((cand & (key.to(tl.int64) >= mid)).to(tl.int32), 1), 0)
        ok = n >= take
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    need = take - tl.sum(tl.sum((cand & (key.to(tl.int64) > lo)).to(tl.int32), 1), 0)
    _store_chosen(cand, key, lo, need, 0, h, j, Index, Count, b, q, MAXB, sib, sih, siq, sij, scb, sch, scq, HKV)


@triton.jit
def _select_kernel_chunked(
    S, Blocks, BlockPos, Index, Count,
    NKB, sink, local, MAXB, MAX_BUDGET,
    ssb, ssh, ssq, ssk, spb, spq, sbb, sbq, sib, sih, siq, sij, scb, sch, scq,
    HKV: tl.constexpr, HC: tl.constexpr, NKB_P: tl.constexpr,
):
    """_select_kernel's result with the tile walked HC heads at a time: every count is summed over the chunks, and
    the ties at the threshold are ranked in (head, block) order by carrying the ties of earlier chunks."""
    q = tl.program_id(0)
    b = tl.program_id(1)
    i = tl.load(BlockPos + b * sbb + q * sbq)
    budget = tl.load(Blocks + b * spb + q * spq) * HKV
    n_cand = 0
    for c in range(0, HKV, HC):
        cand, key, h, j = _tile_keys(S, i, c, b, q, NKB, sink, local, ssb, ssh, ssq, ssk, HKV, HC, NKB_P)
        n_cand += tl.sum(tl.sum(cand.to(tl.int32), 1), 0)
    take = tl.minimum(tl.minimum(budget, MAX_BUDGET), n_cand)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483648, tl.int64)
    for _ in range(33):
        mid = (lo + hi) // 2
        n = 0
        for c in range(0, HKV, HC):
            cand, key, h, j = _tile_keys(S, i, c, b, q, NKB, sink, local, ssb, ssh, ssq, ssk, HKV, HC, NKB_P)
            n += tl.sum(tl.sum((cand & (key.to(tl.int64) >= mid)).to(tl.int32), 1), 0)
        ok = n >= take
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    n_above = 0
    for c in range(0, HKV, HC):
        cand, key, h, j = _tile_keys(S, i, c, b, q, NKB, sink, local, ssb, ssh, ssq, ssk, HKV, HC, NKB_P)
        n_above += tl.sum(tl.sum((cand & (key.to(tl.int64) > lo)).to(tl.int32), 1), 0)
    need = take - n_above
    ties_before = 0  # ties in the heads of earlier chunks, which rank first
    for c in range(0, HKV, HC):
        cand, key, h, j = _tile_keys(S, i, c, b, q, NKB, sink, local, ssb, ssh, ssq, ssk, HKV, HC, NKB_P)
        ties_before += _store_chosen(cand, key, lo, need, ties_before, h, j, Index, Count, b, q, MAXB,
                                     sib, sih, siq, sij, scb, sch, scq, HKV)


# The most scores one program holds in registers (~64 a thread at 16 warps; the cumsums' scratch, 4 bytes a score,
# fits the shared memory). A larger tile (40 heads x 2,048 blocks needs 512 KiB) goes in chunks of heads.
MAX_TILE = 32768


def _num_warps(tile: int) -> int:
    # the whole (heads x key blocks) tile lives in registers: ~64 scores per thread at most
    return 4 if tile <= 2048 else 8 if tile <= 8192 else 16


def _heads_per_chunk(heads: int, nkb_p: int) -> int:
    """The largest power of two of heads whose chunk fits MAX_TILE (at least one head, whatever its width)."""
    hc = 1
    while hc * 2 * nkb_p <= MAX_TILE and hc * 2 <= pow2(heads, least=2):
        hc *= 2
    return hc


def select_key_blocks(
    scores: torch.Tensor, budget: BlockBudget, block_pos: torch.Tensor | None = None, max_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference_select.select_key_blocks in one kernel. Without max_budget the lists' width depends on the data
    (a device sync): that case is left to the reference."""
    if max_budget is None:
        return reference_select.select_key_blocks(scores, budget, block_pos)
    B, Hkv, nqb, nkb = scores.shape
    dev = scores.device
    maxb = min(nkb, max_budget)
    pos = torch.arange(nqb, device=dev)[None, :] if block_pos is None else block_pos.to(dev)
    blocks = budget.blocks_tensor(pos).expand(B, nqb)
    pos = pos.expand(B, nqb)
    index = torch.full((B, Hkv, nqb, maxb), -1, dtype=torch.int32, device=dev)
    count = torch.empty(B, Hkv, nqb, dtype=torch.int32, device=dev)
    s = scores.float()
    nkb_p = pow2(nkb)
    args = (s, blocks, pos, index, count, nkb, budget.sink_blocks, budget.local_blocks, maxb, max_budget,
            *s.stride(), *blocks.stride(), *pos.stride(), *index.stride(), *count.stride())
    if pow2(Hkv, least=2) * nkb_p <= MAX_TILE:
        _select_kernel[(nqb, B)](*args, HKV=Hkv, HP=pow2(Hkv, least=2), NKB_P=nkb_p,
                                 num_warps=_num_warps(Hkv * nkb_p))
    else:
        hc = _heads_per_chunk(Hkv, nkb_p)
        _select_kernel_chunked[(nqb, B)](*args, HKV=Hkv, HC=hc, NKB_P=nkb_p, num_warps=_num_warps(hc * nkb_p))
    return index, count


@triton.jit
def _scores_from_bins(
    P, S, NKB, K,
    spb, sph, spr, spk, ssb, ssh, ssr, ssk,
    H: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Row r's score of key block j: its bin's probability over the bin's width in blocks; -inf past r."""
    r = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < NKB
    n = r + 1  # the row's causal key blocks
    bins = tl.minimum((j * K) // n, K - 1)  # bins.key_bins
    width = tl.maximum(((bins + 1) * n + K - 1) // K - (bins * n + K - 1) // K, 1)  # bins.bin_starts
    p = tl.load(P + b * spb + h * sph + r * spr + bins * spk, mask=j_ok, other=0.0).to(tl.float32)
    s = tl.where(j > r, float("-inf"), tl.math.div_rn(p, width.to(tl.float32)))  # IEEE division, as torch's
    tl.store(S + b * ssb + h * ssh + r * ssr + j * ssk, s, mask=j_ok)


def block_scores_from_bins(probs: torch.Tensor, num_key_blocks: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """reference_block_rows.block_scores_from_bins in one kernel (the full pass's rows 0..R-1; the decoder's rows at
    given positions are a few, left to the reference)."""
    if rows is not None:
        return reference_block_rows.block_scores_from_bins(probs, num_key_blocks, rows)
    B, H, R, K = probs.shape
    scores = torch.empty(B, H, R, num_key_blocks, dtype=torch.float32, device=probs.device)
    block_j = min(1024, pow2(num_key_blocks))
    _scores_from_bins[(R, B * H, triton.cdiv(num_key_blocks, block_j))](
        probs, scores, num_key_blocks, K, *probs.stride(), *scores.stride(), H=H, BLOCK_J=block_j,
    )
    return scores
