"""Fused teacher target in Triton: dense causal attention rows pooled into K bins, never T x T.

Contract: `kernels.reference_teacher_target.teacher_target` (same signature, same outputs).

Grid (query block, batch x KV head x head chunk); rows of HPP query heads of one KV head are
stacked as in the block-sparse kernel, so each K tile is loaded once for all of them. Two passes
over the causal key tiles of the block:
1. online row max / sum in fp32 (base 2) -> row log-sum-exp, stored in natural log;
2. p = exp(s - lse); key s of row t goes to bin floor(s * K / (t + 1)). Bins are monotone in s,
   so within a tile a row's keys form runs of equal bin. With c = cumsum(p) along the tile, a
   run's total is c(its end) - c(previous run's end): each run end adds +c to its bin and -c to
   the next run's bin with `tl.atomic_add`. That is under 2 (K + T / BLOCK_N) atomics per row
   instead of T / 2 (one per key), and no segmented scan (which the interpreter runs element by
   element in Python) is needed.

Why atomics rather than a per-row register accumulator: the bins a tile hits differ per row
and move with the tile, and a (rows x K) register tile cannot be indexed at run-time columns;
a one-hot (rows x keys x K) reduction would cost K times the score tile. Each program owns its
rows, so the atomics never contend across programs; `tl.atomic_add` runs in both the
interpreter and on the GPU. The sum order within a (row, bin) can vary across runs at the ulp level.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.block_sparse_attention import LOG2E, _dot_precision, _num_warps, _stacked_rows, heads_per_program

BLOCK_M = 64
BLOCK_N = 64
MAX_ROWS = 128  # rows of a stacked tile (heads x BLOCK_M); tune on the GPU


@triton.jit
def _teacher_kernel(
    Q, K, Pooled, Lse,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    Hkv, T, qk_scale, NBINS,
    G: tl.constexpr, HPP: tl.constexpr, NHC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    i = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
    pid = tl.program_id(1)
    hc = pid % NHC
    b = (pid // NHC) // Hkv
    hk = (pid // NHC) % Hkv
    g, t, row_ok = _stacked_rows(i, hc, T, G, HPP, BLOCK_M)
    head = (hk * G + g).to(tl.int64)
    row = (b * Hkv * G).to(tl.int64) + head  # (batch, query head) row of the outputs
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    cols = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b.to(tl.int64) * sqb + head[:, None] * sqh + t[:, None] * sqt + dcol[None, :] * sqd,
                mask=row_ok[:, None] & dmask[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    n_tiles = tl.cdiv(tl.minimum(T, (i + 1) * BLOCK_M), BLOCK_N)

    m_i = tl.full([HPP * BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([HPP * BLOCK_M], tl.float32)
    for jt in range(0, n_tiles):
        kpos = jt * BLOCK_N + cols
        kt = tl.load(k_base + kpos[None, :] * skt + dcol[:, None] * skd, mask=dmask[:, None] & (kpos < T)[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        s = tl.where(row_ok[:, None] & (kpos[None, :] <= t[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    # every valid row has its own key, so l_i > 0 there; padded rows get a finite dummy
    lse2 = tl.where(row_ok, m_i + tl.log2(tl.where(row_ok, l_i, 1.0)), 0.0)
    tl.store(Lse + row * T + t, lse2 * 0.6931471805599453, mask=row_ok)

    out_row = Pooled + row[:, None] * T * NBINS + t[:, None] * NBINS
    n_row = t[:, None] + 1
    for jt in range(0, n_tiles):
        kpos = jt * BLOCK_N + cols
        kt = tl.load(k_base + kpos[None, :] * skt + dcol[:, None] * skd, mask=dmask[:, None] & (kpos < T)[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        valid = row_ok[:, None] & (kpos[None, :] <= t[:, None])
        p = tl.exp2(tl.where(valid, s, float("-inf")) - lse2[:, None])
        # a run of equal bin ends at the tile's last key or where the next key changes bin (always
        # at key == t); its sum is c(end) - c(previous run's end), added as +c to its own bin and -c
        # to the next run's bin, so no segmented scan is needed
        key = kpos[None, :]
        bins = key * NBINS // n_row
        next_bins = (key + 1) * NBINS // n_row
        tile_end = key == jt * BLOCK_N + BLOCK_N - 1
        end = valid & (tile_end | (next_bins != bins))
        c = tl.cumsum(p, 1)
        tl.atomic_add(out_row + bins, c, mask=end, sem="relaxed")
        tl.atomic_add(out_row + next_bins, -c, mask=end & ~tile_end & (key < t[:, None]), sem="relaxed")


def _teacher_target(q: torch.Tensor, k: torch.Tensor, scale: float, K: int, block_m: int = BLOCK_M,
                    block_n: int = BLOCK_N) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher with its tile sizes exposed (the tests use small ones)."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[2:] != (T, d) or Hq % Hkv:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    G = Hq // Hkv
    hpp = heads_per_program(G, block_m, MAX_ROWS)
    nhc = triton.cdiv(G, hpp)
    block_d = max(16, triton.next_power_of_2(d))
    pooled = torch.zeros(B, Hq, T, K, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    _teacher_kernel[(triton.cdiv(T, block_m), B * Hkv * nhc)](
        q, k, pooled, lse, *q.stride(), *k.stride(), Hkv, T, scale * LOG2E, K,
        G=G, HPP=hpp, NHC=nhc, BLOCK_M=block_m, BLOCK_N=block_n, D=d, BLOCK_D=block_d,
        PREC=_dot_precision(q.dtype), num_warps=_num_warps(hpp * block_m * max(block_d, block_n)), num_stages=2,
    )
    # a bin's +c / -c run writes cancel to ~1e-9 of rounding, which can dip below 0 in an empty bin
    return pooled.clamp_min_(0.0), lse


def teacher_target(q: torch.Tensor, k: torch.Tensor, scale: float, K: int, query_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's attention rows pooled into the K bins of each row's own prefix.

    Returns (pooled probabilities (B, Hq, T, K) fp32, rows sum to 1; row log-sum-exp (B, Hq, T)).
    `query_chunk` is accepted for the reference's signature and ignored: the kernel's memory is
    O(B * Hq * T * K) (the output) whatever the chunk.
    """
    return _teacher_target(q, k, scale, K)
