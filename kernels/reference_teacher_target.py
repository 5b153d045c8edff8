"""Reference of kernels.teacher_target: the teacher's dense causal attention pooled into each row's K bins,
chunk by chunk; and the same attention's mass per (query block, key block), the oracle's scores."""

from __future__ import annotations

import math

import torch

from kernels.bins import key_bins


def causal_scores_chunk(q: torch.Tensor, k: torch.Tensor, t0: int, t1: int, scale: float) -> torch.Tensor:
    """Causally masked fp32 scores of query rows [t0, t1) against keys [0, t1): (B, Hq, C, t1)."""
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qc = q[:, :, t0:t1].float().reshape(B, Hkv, G * (t1 - t0), d)
    s = (qc @ k[:, :, :t1].float().transpose(-1, -2)).view(B, Hq, t1 - t0, t1).mul_(scale)
    rows = torch.arange(t0, t1, device=q.device)
    future = torch.arange(t1, device=q.device)[None, :] > rows[:, None]
    return s.masked_fill_(future, float("-inf"))  # in place: one (C x t1) buffer per chunk


def teacher_target(q: torch.Tensor, k: torch.Tensor, scale: float, K: int, query_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's attention rows pooled into the K bins of each row's own prefix.

    Returns (pooled probabilities (B, Hq, T, K) fp32, rows sum to 1; row log-sum-exp (B, Hq, T)).
    Never holds more than (B, Hq, query_chunk, T) scores.
    """
    B, Hq, T, _ = q.shape
    pooled = torch.zeros(B, Hq, T, K, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, query_chunk):
        t1 = min(T, t0 + query_chunk)
        s = causal_scores_chunk(q, k, t0, t1, scale)
        row_lse = torch.logsumexp(s, dim=-1)
        p = s.sub_(row_lse.unsqueeze(-1)).exp_()
        bins = key_bins(torch.arange(t0, t1, device=q.device), t1, K).expand(B, Hq, -1, -1)
        pooled[:, :, t0:t1].scatter_add_(-1, bins, p)
        lse[:, :, t0:t1] = row_lse
    return pooled, lse


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, query_chunk: int = 256) -> torch.Tensor:
    """The teacher's true attention mass per (query block, key block), summed over a KV head's query heads.

    The oracle's scores: (B, Hkv, NQB, NKB), -inf above the diagonal. Chunked over queries (no T x T tensor).
    """
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    nb = math.ceil(T / block_size)
    chunk = block_size * max(1, query_chunk // block_size)
    mass = torch.zeros(B, Hkv, nb, nb, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = causal_scores_chunk(q, k, t0, t1, scale)
        p = s.sub_(torch.logsumexp(s, dim=-1, keepdim=True)).exp_()  # (B, Hq, C, t1)
        kb = torch.nn.functional.pad(p, (0, nb * block_size - t1)).view(B, Hkv, Hq // Hkv, t1 - t0, -1, block_size).sum((2, 5))
        qb = torch.arange(t0, t1, device=q.device) // block_size
        mass[:, :, :, : kb.shape[-1]].index_add_(2, qb, kb)
    causal = torch.arange(nb, device=q.device)[None, :] <= torch.arange(nb, device=q.device)[:, None]
    return mass.masked_fill(~causal, float("-inf"))
