"""Reference of kernels.select_blocks: from the compressed estimate to the keys each query attends to
(block scores, the grouped top-k over key blocks, sorted lists; the paper's per-query top-k over bins)."""

from __future__ import annotations

import math

import torch

from kernels.bins import bin_starts
from kernels.block_budget import BlockBudget


def pool_key_block_scores(est: torch.Tensor, block_size: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Compressed estimate -> scores of (query block, key block) pairs.

    est: (B, H, T, K) probabilities per row over its K bins. Rows of a query block are
    averaged in the bin coordinates of the block's last row (prefixes within a block differ
    by < block_size keys); each bin's mass is spread evenly over its keys and summed per key
    block. Returns (B, H, NQB, NKB) with -inf above the diagonal.

    lengths: (B,) real rows of a right-padded batch (default: all T). Pad rows are left out of
    the mean and a block's bins are read at its last *real* row, so every real query block
    scores exactly as in its unpadded sequence; pad-only blocks get finite scores no real row uses.
    """
    B, H, T, K = est.shape
    dev = est.device
    nb = math.ceil(T / block_size)
    if lengths is None:
        lengths = torch.full((B,), T, device=dev)
    real = torch.arange(T, device=dev)[None, :] < lengths[:, None]  # (B, T)
    e = torch.nn.functional.pad(est.float().masked_fill(~real[:, None, :, None], 0.0), (0, 0, 0, nb * block_size - T))
    e = e.view(B, H, nb, block_size, K)
    block_start = torch.arange(nb, device=dev) * block_size
    rows_in_block = torch.clamp(lengths[:, None] - block_start, min=1, max=block_size)  # (B, NQB)
    pooled = e.sum(3) / rows_in_block.view(B, 1, nb, 1)  # (B, H, NQB, K)
    n = torch.minimum(block_start + block_size, lengths[:, None]).clamp_min(1).float()  # (B, NQB) last real row's prefix
    scores = spread_bins_to_key_blocks(pooled, n, block_size, nb)
    causal = torch.arange(nb, device=dev)[None, :] <= torch.arange(nb, device=dev)[:, None]
    return scores.masked_fill(~causal, float("-inf"))


def spread_bins_to_key_blocks(pooled: torch.Tensor, n: torch.Tensor, block_size: int, num_key_blocks: int) -> torch.Tensor:
    """pooled (B, H, R, K) probabilities over the K bins of a prefix of n (B, R) keys -> (B, H, R, NKB)
    mass per key block: each bin's mass spread evenly over its keys. Shared by the prefill's pooling
    and the decoder's one query block, so both score blocks with the same arithmetic."""
    B, H, R, K = pooled.shape
    cdf = torch.nn.functional.pad(pooled.cumsum(-1), (1, 0))  # mass before each bin edge, (.., K+1)
    edges = torch.arange(num_key_blocks + 1, device=pooled.device).float() * block_size  # key block edges
    u = torch.clamp(edges[None, None, :] * K / n[:, :, None], max=K)  # (B, R, NKB+1) in bin units
    lo = torch.clamp(u.floor().long(), max=K - 1)
    frac = (u - lo).unsqueeze(1)
    lo_e = lo.unsqueeze(1).expand(B, H, -1, -1)
    F = torch.gather(cdf, -1, lo_e) + frac * torch.gather(pooled, -1, lo_e)
    return F[..., 1:] - F[..., :-1]


def select_key_blocks(
    scores: torch.Tensor, budget: BlockBudget, block_pos: torch.Tensor | None = None, max_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped top-k over key blocks: the KV heads of a query block share one budget.

    scores: (B, Hkv, NQB, NKB) with -inf for non-causal blocks. Query block i keeps
    budget.blocks(i) * Hkv blocks in all, always including the sink blocks and the local
    (diagonal) blocks of every head.
    block_pos: (B or 1, NQB) position i of each row of scores (default 0..NQB-1; the decoder passes
    each sequence's current query block). max_budget: a bound on the largest budget known on the
    host (the decoder's), which spares a device sync and fixes the output's shape (MAXB =
    min(NKB, max_budget), -1 padded). Returns (block_index (B, Hkv, NQB, MAXB) int32 sorted and -1
    padded, block_count (B, Hkv, NQB) int32).
    """
    B, Hkv, nqb, nkb = scores.shape
    i = torch.arange(nqb, device=scores.device)[None, :] if block_pos is None else block_pos.to(scores.device)
    i = i[..., None]  # (B or 1, NQB, 1)
    j = torch.arange(nkb, device=scores.device)
    forced = ((j < budget.sink_blocks) | ((j <= i) & (j > i - budget.local_blocks))) & (j <= i)  # (B or 1, NQB, NKB)
    s = scores.float().masked_fill(forced[:, None], float("inf"))
    total = budget.blocks_tensor(i[..., 0]) * Hkv  # (B or 1, NQB)
    # top-k of the largest budget instead of a full sort: the budget is far below Hkv * NKB at long T
    kmax = min(int(total.max()) if max_budget is None else max_budget, Hkv * nkb)
    values, picked = _grouped_topk(s.permute(0, 2, 1, 3), kmax)
    keep = (torch.arange(kmax, device=s.device) < total[..., None]) & (values > float("-inf"))
    chosen = torch.zeros(B, nqb, Hkv * nkb, dtype=torch.bool, device=s.device).scatter_(-1, picked, keep)
    chosen = chosen.view(B, nqb, Hkv, nkb).permute(0, 2, 1, 3)
    return blocks_to_index(chosen, None if max_budget is None else min(nkb, kmax))


def _grouped_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k over the heads' blocks together: s (B, NQB, Hkv, NKB) -> (values, flat indices h * NKB + j),
    sorted. Two stages: each head's own top k, then the top k of those; every overall top-k entry is in
    its head's top k. One long row per query block is slow for torch.topk on a GPU (a single block
    of threads): 8 x 2049 blocks took 90 us at 128k context; short rows run in parallel."""
    B, nqb, Hkv, nkb = s.shape
    k1 = min(k, nkb)
    v1, i1 = s.topk(k1, dim=-1, sorted=False)  # (B, NQB, Hkv, k1)
    i1 = i1 + torch.arange(Hkv, device=s.device).view(1, 1, Hkv, 1) * nkb
    values, j = v1.reshape(B, nqb, Hkv * k1).topk(k, dim=-1, sorted=True)
    return values, i1.reshape(B, nqb, Hkv * k1).gather(-1, j)


def blocks_to_index(chosen: torch.Tensor, maxb: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, NKB) bool -> (sorted index lists, -1 padded, (…, MAXB) int32; counts (…) int32).

    No sort: each chosen block's place in its list is the running count of chosen blocks before it.
    maxb: the lists' width when a bound is known (no device sync), else the largest count.
    """
    nkb = chosen.shape[-1]
    count = chosen.sum(-1)
    if maxb is None:
        maxb = max(int(count.max()), 1) if count.numel() else 1
    place = torch.where(chosen, chosen.cumsum(-1) - 1, maxb)  # unchosen go to a spare column
    idx = torch.full((*chosen.shape[:-1], maxb + 1), -1, dtype=torch.int32, device=chosen.device)
    idx.scatter_(-1, place, torch.arange(nkb, dtype=torch.int32, device=chosen.device).expand_as(place))
    return idx[..., :maxb].contiguous(), count.to(torch.int32)


def select_bins_per_query(est: torch.Tensor, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's grouped per-query top-k over bins.

    est: (B, Hkv, T, K) group-pooled estimate. Row t keeps about Hkv * k * K / (t+1) bins in
    all (about k keys per head), shared by the heads; empty bins are never chosen; each head
    always keeps the bin holding the row's own key (so no head is left with no key).
    rows: the rows' positions, (T,) or per sequence (B, T) (default 0..T-1; the decoder passes
    each sequence's new position). Returns bin_mask (B, Hkv, T, K) bool.
    """
    B, Hkv, T, K = est.shape
    rows = torch.arange(T, device=est.device) if rows is None else rows.to(est.device)
    starts = bin_starts(rows, K)
    nonempty = starts[..., 1:] > starts[..., :-1]  # (.., T, K)
    own_bin = torch.clamp((rows * K) // (rows + 1), max=K - 1)  # bin of key t in row t
    forced = torch.zeros(nonempty.shape, dtype=torch.bool, device=est.device).scatter_(-1, own_bin[..., None], True)
    per_seq = (lambda x: x[:, None]) if rows.dim() == 2 else (lambda x: x[None, None])
    s = est.float().masked_fill(~per_seq(nonempty), float("-inf")).masked_fill(per_seq(forced), float("inf"))
    budget = torch.ceil(Hkv * k * K / (rows + 1).float()).long().clamp_min(Hkv)  # never below the forced bins
    flat = s.permute(0, 2, 1, 3).reshape(B, T, Hkv * K)
    order = flat.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(Hkv * K, device=est.device).expand_as(order))
    chosen = (ranks < budget.view(-1, T, 1)) & (flat > float("-inf"))
    return chosen.view(B, T, Hkv, K).permute(0, 2, 1, 3)
