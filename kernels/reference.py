"""Pure-PyTorch reference ops of SEA attention.

Each op here has the exact signature of its Triton counterpart (later, in the
sibling modules); tests compare the two. Every op works in query chunks so that
no T x T tensor is ever held: memory is O(chunk x T), linear in T.

Shapes: q (B, Hq, T, d); k, v (B, Hkv, T, d) with Hq a multiple of Hkv (GQA:
query head h reads KV head h // (Hq // Hkv)). Positions are causal and start at 0.
"""

from __future__ import annotations

import math

import torch

from kernels.block_budget import BlockBudget

# ---------------------------------------------------------------------------
# bins: row t's K bins stretch over its own prefix of length n = t + 1;
# key s of row t falls in bin floor(s * K / n).


def key_bins(rows: torch.Tensor, num_keys: int, K: int) -> torch.Tensor:
    """Bin index of every key s < num_keys for each query row in `rows` (clamped to K-1 past the row)."""
    s = torch.arange(num_keys, device=rows.device)
    n = (rows + 1).unsqueeze(-1)
    return torch.clamp((s * K) // n, max=K - 1)


def bin_starts(rows: torch.Tensor, K: int) -> torch.Tensor:
    """First key of each bin m = 0..K (K+1 edges) per row: ceil(m * n / K). Bin m is empty iff start[m] == start[m+1]."""
    m = torch.arange(K + 1, device=rows.device)
    n = (rows + 1).unsqueeze(-1)
    return (m * n + K - 1) // K


# ---------------------------------------------------------------------------
# causal linear attention (the estimator's cost-O(T) part)


def causal_linear_attention(q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """out[t] = sum_{s<=t} (qf_t . kf_s) v_s / sum_{s<=t} (qf_t . kf_s), with non-negative features.

    q_feat: (B, H, T, m); k_feat: (B, Hk, T, m); v: (B, Hk, T, dv) with Hk dividing H (GQA:
    query head h reads head h // (H / Hk)). Chunked: exact attention inside a chunk, a running
    (m x dv) state across chunks. Computed in fp32.
    """
    B, H, T, m = q_feat.shape
    Hk = k_feat.shape[1]
    G = H // Hk
    dv = v.shape[-1]
    pad = (-T) % chunk
    qf, kf, vv = (torch.nn.functional.pad(x.float(), (0, 0, 0, pad)) for x in (q_feat, k_feat, v))
    nc = (T + pad) // chunk
    # The G query heads of a KV head read the same keys and state: their rows of a chunk go side by
    # side (G * chunk rows), so keys, values and the running state are never repeated per query head.
    qf = qf.view(B, Hk, G, nc, chunk, m).transpose(2, 3).reshape(B, Hk, nc, G * chunk, m)
    kf = kf.view(B, Hk, nc, chunk, m)
    vv = vv.view(B, Hk, nc, chunk, dv)
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q_feat.device).tril().repeat(G, 1)
    scores = (qf @ kf.transpose(-1, -2)).masked_fill(~tril, 0.0)
    state = kf.transpose(-1, -2) @ vv  # (B, Hk, nc, m, dv)
    norm = kf.sum(-2)  # (B, Hk, nc, m)
    prev_state = state.cumsum(2) - state  # exclusive prefix over chunks
    prev_norm = norm.cumsum(2) - norm
    num = scores @ vv + qf @ prev_state
    den = scores.sum(-1) + (qf @ prev_norm.unsqueeze(-1)).squeeze(-1)
    out = num / den.clamp_min(1e-30).unsqueeze(-1)
    out = out.view(B, Hk, nc, G, chunk, dv).transpose(2, 3).reshape(B, H, nc * chunk, dv)
    return out[:, :, :T]


def linear_attention_step(
    q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor, state: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """One new position of causal_linear_attention from its running state (decoding).

    q_feat (B, H, 1, m); k_feat (B, Hk, 1, m); v (B, Hk, 1, dv); state (B, Hk, m, dv) and norm
    (B, Hk, m): sums over the earlier keys of kf^T v and kf, fp32, updated in place with the new
    key. Returns the new row's output (B, H, 1, dv), what causal_linear_attention gives for it.
    """
    B, H, _, m = q_feat.shape
    Hk = k_feat.shape[1]
    kf = k_feat.float()
    state += kf.transpose(-1, -2) @ v.float()
    norm += kf[:, :, 0]
    qf = q_feat.float().view(B, Hk, H // Hk, m)
    num = qf @ state  # (B, Hk, G, dv)
    den = (qf @ norm.unsqueeze(-1)).clamp_min(1e-30)
    return (num / den).view(B, H, 1, -1)


# ---------------------------------------------------------------------------
# the teacher target: dense causal attention pooled into K bins, chunk by chunk


def _scores_chunk(q: torch.Tensor, k: torch.Tensor, t0: int, t1: int, scale: float) -> torch.Tensor:
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
        s = _scores_chunk(q, k, t0, t1, scale)
        row_lse = torch.logsumexp(s, dim=-1)
        p = s.sub_(row_lse.unsqueeze(-1)).exp_()
        bins = key_bins(torch.arange(t0, t1, device=q.device), t1, K).expand(B, Hq, -1, -1)
        pooled[:, :, t0:t1].scatter_add_(-1, bins, p)
        lse[:, :, t0:t1] = row_lse
    return pooled, lse


# ---------------------------------------------------------------------------
# sparse attention over selected keys


def _masked_attention_chunk(q, k, v, t0, t1, scale, keep):
    """Softmax over the kept causal keys of rows [t0, t1). keep: (B, Hkv, C, t1) bool, shared by a KV head's group."""
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    C = t1 - t0
    s = _scores_chunk(q, k, t0, t1, scale).view(B, Hkv, G, C, t1)
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
        s = _scores_chunk(q, k, t0, t1, scale)
        p = s.sub_(torch.logsumexp(s, dim=-1, keepdim=True)).exp_()  # (B, Hq, C, t1)
        kb = torch.nn.functional.pad(p, (0, nb * block_size - t1)).view(B, Hkv, Hq // Hkv, t1 - t0, -1, block_size).sum((2, 5))
        qb = torch.arange(t0, t1, device=q.device) // block_size
        mass[:, :, :, : kb.shape[-1]].index_add_(2, qb, kb)
    causal = torch.arange(nb, device=q.device)[None, :] <= torch.arange(nb, device=q.device)[:, None]
    return mass.masked_fill(~causal, float("-inf"))


# ---------------------------------------------------------------------------
# mask construction


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


# ---------------------------------------------------------------------------
# decoding: one new query per sequence against a KV cache


def _masked_decode(q, k, v, keep, scale):
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    s = (q.float().view(B, Hkv, Hq // Hkv, d) @ k.float().transpose(-1, -2)) * scale  # (B, Hkv, G, S)
    s = s.masked_fill(~keep[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = (p @ v.float()).view(B, Hq, 1, d)
    return out.to(q.dtype), lse.view(B, Hq, 1)


def _logical_keys(start: torch.Tensor, length: torch.Tensor, cache_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logical index of every cache slot (B, S), whether it holds one of the sequence's keys (B, S))."""
    logical = torch.arange(cache_len, device=start.device)[None, :] - start[:, None]
    return logical, (logical >= 0) & (logical < length[:, None])


def sparse_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_count: torch.Tensor,
    block_size: int, scale: float, start: torch.Tensor, length: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new query of each sequence over its selected key blocks of the cache.

    q (B, Hq, 1, d); k, v (B, Hkv, S, d): the cache, sequence b's keys 0..length[b]-1 at slots
    start[b] + j (left padding before them; the new key included). block_index (B, Hkv, MAXB) the
    selected key blocks in the sequence's own positions, sorted, -1 padded; block_count (B, Hkv).
    Returns (out (B, Hq, 1, d) in q.dtype, lse (B, Hq, 1) fp32): block_sparse_attention's last row.
    """
    B, Hkv, S, _ = k.shape
    nkb = math.ceil(S / block_size)
    valid = torch.arange(block_index.shape[-1], device=q.device) < block_count.unsqueeze(-1)
    blocks = torch.zeros(B, Hkv, nkb + 1, dtype=torch.bool, device=q.device)
    blocks.scatter_(-1, torch.where(valid, block_index.long(), nkb), True)
    logical, inside = _logical_keys(start, length, S)
    keep = blocks.gather(-1, (logical.clamp(0, S - 1) // block_size)[:, None, :].expand(B, Hkv, S)) & inside[:, None, :]
    return _masked_decode(q, k, v, keep, scale)


def per_query_sparse_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bin_mask: torch.Tensor, scale: float,
    start: torch.Tensor, length: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new query of each sequence over the keys of its selected bins (bin_mask (B, Hkv, K) over
    its prefix of length[b] keys): per_query_sparse_attention's last row. Cache layout as above."""
    B, Hkv, S, _ = k.shape
    K = bin_mask.shape[-1]
    logical, inside = _logical_keys(start, length, S)
    bins = torch.clamp((logical.clamp_min(0) * K) // length[:, None], max=K - 1)  # key_bins of row length-1
    keep = bin_mask.gather(-1, bins[:, None, :].expand(B, Hkv, S)) & inside[:, None, :]
    return _masked_decode(q, k, v, keep, scale)


# ---------------------------------------------------------------------------
# the fused decode step's ops: their reference lives beside the predictor's math in
# kernels.reference_decode, which builds on the ops above (hence looked up lazily, no import cycle)

# Ops that live in their own modules and resolve through this one (kernels.dispatch builds the op sets
# from it): the decode step's, and the block-row predictor's.
_BLOCK_ROW_OPS = ("block_linear_attention", "block_rows_estimate", "block_teacher_target", "block_scores_from_bins", "opening_means",
                  "block_sparse_attention_gated",
                  "decode_block_sums", "decode_block_row", "decode_block_cnn_probs", "decode_select_block_row")
_DECODE_STEP_OPS = ("decode_predictor_rows", "decode_cnn_probs", "decode_select_blocks", "decode_mix_output",
                    "sparse_decode_mixed")


def __getattr__(name: str):
    if name in _DECODE_STEP_OPS:
        from kernels import reference_decode

        return getattr(reference_decode, name)
    if name in _BLOCK_ROW_OPS:
        from kernels import reference_block_rows

        return getattr(reference_block_rows, name)
    raise AttributeError(f"module 'kernels.reference' has no attribute {name!r}")
