"""Reference of kernels.block_sparse_attention (and kernels.cpu_block_sparse): causal attention over the
selected key blocks, the paper's per-query mode over selected bins, and dense attention (the ground truth).

Shapes: q (B, Hq, T, d); k, v (B, Hkv, T, d) with Hq a multiple of Hkv (GQA: query head h reads KV head
h // (Hq // Hkv)). Every op works in query chunks: no T x T tensor is ever held."""

from __future__ import annotations

import math

import torch

from kernels.bins import key_bins
from kernels.reference_teacher_target import causal_scores_chunk


def _masked_attention_chunk(q, k, v, t0, t1, scale, keep):
    """Softmax over the kept causal keys of rows [t0, t1). keep: (B, Hkv, C, t1) bool, shared by a KV head's group."""
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    C = t1 - t0
    s = causal_scores_chunk(q, k, t0, t1, scale).view(B, Hkv, G, C, t1)
    s = s.masked_fill(~keep.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # a row with no key gives 0, not NaN
    out = (p.view(B, Hkv, G * C, t1) @ v[:, :, :t1].float()).view(B, Hq, C, d)
    return out, lse.view(B, Hq, C)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each query block over its listed key blocks.

    block_index: (B, Hkv, NQB, MAXB) int, sorted, -1 padded; block_count: (B, Hkv, NQB).
    The query heads of one KV head share its list. Returns (out (B, Hq, T, d) in q.dtype,
    row log-sum-exp (B, Hq, T) fp32; -inf for a row with no key).
    """
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    nqb = block_index.shape[2]
    nkb = math.ceil(T / block_size)
    # dense (query block x key block) picture of the lists; (T/bs)^2, fine for a reference
    valid = torch.arange(block_index.shape[-1], device=q.device) < block_count.unsqueeze(-1)
    blocks = torch.zeros(B, Hkv, nqb, nkb + 1, dtype=torch.bool, device=q.device)
    blocks.scatter_(-1, torch.where(valid, block_index.long(), nkb), True)
    blocks = blocks[..., :nkb]
    out = torch.empty(B, Hq, T, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    chunk = block_size * max(1, 256 // block_size)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        rows = torch.arange(t0, t1, device=q.device)
        key_block = torch.arange(t1, device=q.device) // block_size
        keep = blocks[:, :, rows // block_size][..., key_block]  # (B, Hkv, C, t1)
        out[:, :, t0:t1], lse[:, :, t0:t1] = _masked_attention_chunk(q, k, v, t0, t1, scale, keep)
    return out.to(q.dtype), lse


def per_query_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bin_mask: torch.Tensor,
    scale: float,
    query_chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's mode: row t attends to the keys of its selected bins (bin_mask (B, Hkv, T, K) bool)."""
    B, Hq, T, d = q.shape
    K = bin_mask.shape[-1]
    out = torch.empty(B, Hq, T, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, query_chunk):
        t1 = min(T, t0 + query_chunk)
        bins = key_bins(torch.arange(t0, t1, device=q.device), t1, K)
        keep = torch.gather(bin_mask[:, :, t0:t1], -1, bins.expand(B, bin_mask.shape[1], -1, -1))
        out[:, :, t0:t1], lse[:, :, t0:t1] = _masked_attention_chunk(q, k, v, t0, t1, scale, keep)
    return out.to(q.dtype), lse


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal GQA attention (SDPA); the teacher's attention and the tests' ground truth."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
