"""Block-sparse decode attention in Triton: one new query per sequence against its selected key blocks
of the KV cache, split over the blocks (flash-decoding) so that one long list keeps the GPU busy.

Contract: `kernels.reference_sparse_decode.sparse_decode_attention` (same signature, same outputs).

Layout of the work
- Grid (batch x KV head, split). A program stacks the G query heads of one KV head (padded to 16
  rows, the smallest tensor-core tile) and walks its share of the KV head's block list: each K/V
  block is read once for the whole group. Keys are addressed in the sequence's own positions:
  slot = start[b] + position, so left-padded caches need no copy.
- Each split keeps an online softmax in fp32 (base 2) and writes its partial output, max and sum;
  a second kernel, one program per (batch, query head), combines the splits (all of them loaded at
  once: a loop over 33 splits of dependent loads took 11.6 us on an H100).
- The number of splits gives about two programs per SM: long lists are cut finer when the batch
  and the KV heads alone would leave the GPU idle. Each split takes an equal share of the list's
  real length (read on the device), not of its padded width: a 32-block list under a 256-wide
  bound is spread over all the splits rather than the first four.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels.tiles import pow2

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    Q, K, V, PartOut, PartM, PartL, BlockIndex, BlockCount, Start, Length,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sib, sih, sij,
    Hkv, S, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    NSPLIT: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    g = tl.arange(0, GP)
    g_ok = g < G
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    cols = tl.arange(0, BLOCK)
    head = (hk * G + g).to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * sqb + head[:, None] * sqh + dcol[None, :] * sqd,
                mask=g_ok[:, None] & dmask[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    start = tl.load(Start + b)
    length = tl.load(Length + b)
    count = tl.load(BlockCount + b * Hkv + hk)
    per_split = tl.cdiv(count, NSPLIT)  # the list's real length (a grouped top-k's lists differ per head)
    first = split * per_split
    last = tl.minimum(first + per_split, count)
    idx = BlockIndex + b * sib + hk * sih

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BLOCK_D], tl.float32)
    for jj in range(first, last):
        pos = tl.load(idx + jj * sij) * BLOCK + cols  # the sequence's own key positions
        key_ok = pos < length
        slot = (start + pos).to(tl.int64)
        kt = tl.load(k_base + slot[None, :] * skt + dcol[:, None] * skd, mask=dmask[:, None] & key_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        s = tl.where(g_ok[:, None] & key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * svt + dcol[None, :] * svd, mask=key_ok[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    part = (pid * NSPLIT + split) * GP + g  # (B*Hkv, NSPLIT, GP) rows
    tl.store(PartOut + part[:, None] * BLOCK_D + dcol[None, :], acc)
    tl.store(PartM + part, m_i)
    tl.store(PartL + part, l_i)


@triton.jit
def gate_weights(s0, s1, kept, n):
    """reference_gates.mix_gated's weights for a row of n causal keys of which `kept` are attended
    (u = 1 - kept / n left out): (weight of the sparse output, weight of the running mean of v)."""
    u = tl.maximum(1.0 - kept / n, 0.0)
    w = tl.sigmoid(s1) * u
    return (1.0 - w) * (1.0 + (2.0 * tl.sigmoid(s0) - 1.0) * u), w


@triton.jit
def _combine_kernel(
    PartOut, PartM, PartL, Out, Lse, sob, soh, sod, Gates, Kept, VSum, Length,
    Hq, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, NSPLIT: tl.constexpr,
    NSP: tl.constexpr, MIX: tl.constexpr, ROUND_TO: tl.constexpr,
):
    """out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s over the splits, one query head per
    program (every split's partial is read in one go: no loop of dependent loads over the splits).
    MIX: then the output gates (reference_gates.mix_gated) on out rounded to ROUND_TO (the
    attention output's dtype, as the unfused ops give it), written fp32; no log-sum-exp."""
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    sp = tl.arange(0, NSP)
    ok = sp < NSPLIT
    dcol = tl.arange(0, BLOCK_D)
    row = ((b * (Hq // G) + h // G) * NSPLIT + sp) * GP + h % G  # (B*Hkv, NSPLIT, GP) rows
    m_s = tl.load(PartM + row, mask=ok, other=float("-inf"))
    m = tl.max(m_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(ok, tl.exp2(m_s - m_use), 0.0)
    l_sum = tl.sum(w * tl.load(PartL + row, mask=ok, other=0.0), 0)
    acc = tl.sum(w[:, None] * tl.load(PartOut + row[:, None] * BLOCK_D + dcol[None, :], mask=ok[:, None], other=0.0), 0)
    has = l_sum > 0.0
    out = acc / tl.where(has, l_sum, 1.0)
    lse = tl.where(has, (m_use + tl.log2(tl.where(has, l_sum, 1.0))) * 0.6931471805599453, float("-inf"))
    if MIX:
        hk = h // G
        nf = tl.load(Length + b).to(tl.float32)
        sparse_weight, w = gate_weights(tl.load(Gates + pid * 2), tl.load(Gates + pid * 2 + 1),
                                        tl.load(Kept + b * (Hq // G) + hk).to(tl.float32), nf)
        mean_v = tl.load(VSum + (b * (Hq // G) + hk) * D + dcol, mask=dcol < D, other=0.0) / nf
        out = sparse_weight * out.to(ROUND_TO).to(tl.float32) + w * mean_v
    tl.store(Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + dcol * sod, out.to(Out.dtype.element_ty),
             mask=dcol < D)
    if not MIX:
        tl.store(Lse + pid, lse)


def num_splits(batch_heads: int, max_blocks: int, sms: int) -> int:
    """Splits of each block list: about two programs per SM, at least one block per split."""
    return max(1, min(max_blocks, math.ceil(2 * sms / max(1, batch_heads))))


@torch.compiler.disable  # launched as is inside a compiled decode step (inductor's re-typing of it fails to build)
def sparse_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_count: torch.Tensor,
    block_size: int, scale: float, start: torch.Tensor, length: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _attend(q, k, v, block_index, block_count, block_size, scale, start, length, None)


@torch.compiler.disable
def sparse_decode_mixed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_count: torch.Tensor,
    block_size: int, scale: float, start: torch.Tensor, length: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor,
    v_sum: torch.Tensor,
) -> torch.Tensor:
    return _attend(q, k, v, block_index, block_count, block_size, scale, start, length, (gates, kept, v_sum))[0]


def _attend(q, k, v, block_index, block_count, block_size, scale, start, length, mix):
    B, Hq, one, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if one != 1:
        raise ValueError(f"sparse_decode_attention takes one query per sequence, got {one}")
    if Hq % Hkv or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"need Hq a multiple of Hkv and block_size a power of two >= 16; got Hq={Hq}, Hkv={Hkv},"
                         f" block_size={block_size}")
    G = Hq // Hkv
    GP = pow2(G)  # the group's rows, padded to tl.dot's 16 at least
    BLOCK_D = triton.next_power_of_2(d)
    maxb = block_index.shape[-1]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    nsplit = num_splits(B * Hkv, maxb, sms)
    dev = q.device
    part_out = torch.empty(B * Hkv, nsplit, GP, BLOCK_D, dtype=torch.float32, device=dev)
    part_m = torch.empty(B * Hkv, nsplit, GP, dtype=torch.float32, device=dev)
    part_l = torch.empty(B * Hkv, nsplit, GP, dtype=torch.float32, device=dev)
    index = block_index.to(torch.int32)
    length = length.to(torch.int64).contiguous()
    _decode_kernel[(B * Hkv, nsplit)](
        q, k, v, part_out, part_m, part_l, index, block_count.to(torch.int32).contiguous(),
        start.to(torch.int64).contiguous(), length,
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(), *v.stride(),
        index.stride(0), index.stride(1), index.stride(2),
        Hkv, S, scale * LOG2E,
        G=G, GP=GP, BLOCK=block_size, D=d, BLOCK_D=BLOCK_D, NSPLIT=nsplit,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    out = torch.empty(B, Hq, 1, d, dtype=q.dtype if mix is None else torch.float32, device=dev)
    lse = torch.empty(B, Hq, 1, dtype=torch.float32, device=dev)
    gates, kept, v_sum = (t.contiguous() for t in mix) if mix is not None else (lse, lse, lse)
    _combine_kernel[(B * Hq,)](part_out, part_m, part_l, out, lse, out.stride(0), out.stride(1), out.stride(3),
                               gates, kept, v_sum, length,
                               Hq, G=G, GP=GP, D=d, BLOCK_D=BLOCK_D, NSPLIT=nsplit, NSP=triton.next_power_of_2(nsplit),
                               MIX=mix is not None, ROUND_TO=_TL_DTYPES[q.dtype], num_warps=4)
    return out, lse


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
