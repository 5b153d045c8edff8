"""The block-row predictor's ops (`sea.predictor_rows: block`), in PyTorch: the specification.

With block rows, the predictor makes one estimate row per (query block, head) instead of one per
query. Its grid is the key blocks: row i (query block i) has n = i + 1 causal key blocks, and its K
bins split those n blocks the way a token row's bins split its keys (`kernels.reference.key_bins`
with key blocks for keys): below the cap (n <= K) each key block is its own bin; above it, a bin
holds ceil or floor of n / K blocks.

Every row of query block i reads the same estimate, made from the block's rows so far (a partial
last block from its real rows only), as block mode's selection already pooled them.
"""

from __future__ import annotations

import math

import torch

from kernels import reference as ref  # a module object: kernels.reference imports this module at its end


def block_means(x: torch.Tensor, block_size: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, NQB, d): the mean of each block's rows, fp32. lengths (B,): real rows of
    a right-padded batch; pads are left out (a block of pads only gets the mean of nothing: 0)."""
    B, H, T, d = x.shape
    nb = math.ceil(T / block_size)
    xf = x.float()
    if lengths is not None:
        real = torch.arange(T, device=x.device)[None, :] < lengths[:, None]
        xf = xf.masked_fill(~real[:, None, :, None], 0.0)
    xf = torch.nn.functional.pad(xf, (0, 0, 0, nb * block_size - T)).view(B, H, nb, block_size, d)
    rows = _rows_in_blocks(T, block_size, lengths, x.device)  # (B or 1, NQB)
    return xf.sum(3) / rows.clamp_min(1)[:, None, :, None]


def _rows_in_blocks(T: int, block_size: int, lengths: torch.Tensor | None, device) -> torch.Tensor:
    nb = math.ceil(T / block_size)
    start = torch.arange(nb, device=device) * block_size
    length = torch.full((1,), T, device=device) if lengths is None else lengths  # a fill, no host-to-device copy
    return (length[:, None] - start[None, :]).clamp(0, block_size).float()


def block_linear_attention(q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor, block_size: int,
                           lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Causal linear attention read at block rows: row i is (qf_i . S_i) / (qf_i . z_i) with S_i, z_i the
    sums of kf_s v_s^T and kf_s over the keys up to block i's last (real) row.

    q_feat: (B, H, NQB, m) features of the block rows; k_feat: (B, Hk, T, m); v: (B, Hk, T, dv), Hk
    dividing H (GQA). lengths (B,): real rows of a right-padded batch (pad keys are left out).
    Returns (B, H, NQB, dv) fp32. Holds (B, Hk, NQB, m, dv) prefix states.
    """
    B, H, R, m = q_feat.shape
    Hk, T = k_feat.shape[1], k_feat.shape[2]
    dv = v.shape[-1]
    pad = R * block_size - T
    kf, vv = (torch.nn.functional.pad(x.float(), (0, 0, 0, pad)) for x in (k_feat, v))
    if lengths is not None:
        real = torch.arange(R * block_size, device=kf.device)[None, :] < lengths[:, None]
        kf = kf.masked_fill(~real[:, None, :, None], 0.0)
    kf = kf.view(B, Hk, R, block_size, m)
    state = (kf.transpose(-1, -2) @ vv.view(B, Hk, R, block_size, dv)).cumsum(2)  # (B, Hk, R, m, dv)
    norm = kf.sum(-2).cumsum(2)  # (B, Hk, R, m)
    qf = q_feat.float().view(B, Hk, H // Hk, R, m)
    num = torch.einsum("bkgrm,bkrmd->bkgrd", qf, state)
    den = torch.einsum("bkgrm,bkrm->bkgr", qf, norm)
    return (num / den.clamp_min(1e-30).unsqueeze(-1)).reshape(B, H, R, dv)


def block_teacher_target(q: torch.Tensor, k: torch.Tensor, scale: float, K: int, block_size: int,
                         query_chunk: int = 256) -> torch.Tensor:
    """The teacher's attention on the block-row grid: for query block i, the mean over its rows of each
    row's attention mass per key block, pooled into row i's K bins of its i + 1 key blocks.

    Returns (B, Hq, NQB, K) fp32, rows sum to 1. Chunked over queries (whole blocks per chunk): never
    more than (B, Hq, chunk, T) scores, and no (NQB x NKB) tensor.
    """
    B, Hq, T, _ = q.shape
    nb = math.ceil(T / block_size)
    chunk = block_size * max(1, query_chunk // block_size)
    target = torch.zeros(B, Hq, nb, K, dtype=torch.float32, device=q.device)
    rows = _rows_in_blocks(T, block_size, None, q.device)[0]  # (NQB,)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = ref._scores_chunk(q, k, t0, t1, scale)
        p = s.sub_(torch.logsumexp(s, dim=-1, keepdim=True)).exp_()  # (B, Hq, C, t1)
        nkb = math.ceil(t1 / block_size)
        per_block = torch.nn.functional.pad(p, (0, nkb * block_size - t1)).view(B, Hq, t1 - t0, nkb, block_size).sum(-1)
        b0, b1 = t0 // block_size, math.ceil(t1 / block_size)
        qb = torch.arange(t0, t1, device=q.device) // block_size - b0
        mass = torch.zeros(B, Hq, b1 - b0, nkb, dtype=torch.float32, device=q.device).index_add_(2, qb, per_block)
        bins = ref.key_bins(torch.arange(b0, b1, device=q.device), nkb, K).expand(B, Hq, -1, -1)
        target[:, :, b0:b1].scatter_add_(-1, bins, mass)
    return target / rows[None, None, :, None]


def block_scores_from_bins(probs: torch.Tensor, num_key_blocks: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Block-row estimate (B, H, R, K) over each row's bins of key blocks -> (B, H, R, NKB) scores:
    each key block gets its bin's probability divided by the bin's width in blocks (1 below the cap).
    -inf above the diagonal. rows: the query-block position of each row, (B, R) (default 0..R-1; the
    decoder passes each sequence's current block)."""
    B, H, R, K = probs.shape
    dev = probs.device
    i = torch.arange(R, device=dev) if rows is None else rows  # (R,) or (B, R)
    j = torch.arange(num_key_blocks, device=dev)
    bins = ref.key_bins(i, num_key_blocks, K)  # each key block's bin in its row, key blocks for keys: (.., R, NKB)
    starts = ref.bin_starts(i, K)
    width = (starts[..., 1:] - starts[..., :-1]).clamp_min(1).float().gather(-1, bins)
    future = j > i[..., None]
    if rows is not None:  # per sequence: broadcast over heads
        bins, width, future = bins[:, None], width[:, None], future[:, None]
    scores = probs.float().gather(-1, bins.expand(B, H, R, num_key_blocks)) / width
    return scores.masked_fill(future, float("-inf"))


# ---------------------------------------------------------------------------
# decoding: the current query block's row, recomputed from its rows so far at every new token


def decode_block_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, shift: torch.Tensor,
                     kv: torch.Tensor, norm: torch.Tensor, v_sum: torch.Tensor, q_block: torch.Tensor,
                     v_block: torch.Tensor, w, scale: float, block_size: int):
    """decode_predictor_rows for block rows: the new token joins its query block, whose row is made again
    from the block's mean query and value, reading the keys up to the new one.

    q (B, Hq, 1, d); k, v (B, Hkv, 1, d) the new key and value at positions pos (B,). Updated in place:
    kv, norm (the estimator's key sums), v_sum (all values), q_block (B, Hq, 1, d) and v_block (B, Hkv, 1, d)
    (sums over the current block's rows; reset when the token opens a block). Returns (the block row's CNN
    input (B, Hq*C, 1, K/4), gates (B, Hq, 1, 2) fp32 or None), as prefill computes for a partial last block.
    """
    from kernels import reference_decode as rd

    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    fresh = (pos % block_size == 0).view(B, 1, 1, 1)
    q_block.masked_fill_(fresh, 0.0).add_(q.float())
    v_block.masked_fill_(fresh, 0.0).add_(v.float())
    rows = (pos % block_size + 1).float().view(B, 1, 1, 1)
    root, proj = math.sqrt(scale), w.projection.float()
    qf = rd.positive_features(q_block / rows * root, proj, is_query=True)
    kf = rd.positive_features(k.float() * root, proj, is_query=False, key_shift=shift)
    positions = w.position_values.float()[pos][:, None, None].expand(-1, Hkv, -1, -1)
    lin = ref.linear_attention_step(qf, kf, torch.cat([v.float(), positions], dim=-1), kv, norm)  # (B, Hq, 1, 2d)
    v_sum += v.float()
    wdtype = w.dec_weight.dtype
    h = rd.encode_rows(lin.to(wdtype), (v_block / rows).to(wdtype), Hq // Hkv, w)
    gates = torch.nn.functional.linear(h, w.gate_weight, w.gate_bias).float() if w.gate_weight is not None else None
    return rd.decode_rows(h, w), gates


def decode_block_cnn_probs(ring: torch.Tensor, current: torch.Tensor, row: torch.Tensor, pos: torch.Tensor,
                           block_size: int, w, num_kv_heads: int) -> torch.Tensor:
    """decode_cnn_probs for block rows. ring (B, Hq*C, R, K/4): the CNN input rows of the R = receptive rows - 1
    complete blocks before the current one (block b in slot b % R); current (B, Hq*C, 1, K/4): the current
    block's row so far. row: the block's new row, for the token at pos (B,). When the token opens a block,
    the finished block's row moves into the ring; `current` becomes `row` (both in place).
    Returns the block row's probabilities (B, Hkv, K) fp32, pooled over each KV head's query heads."""
    from kernels import reference_decode as rd

    B, C, R, W = ring.shape
    qb = pos // block_size
    fresh = (pos % block_size == 0) & (qb > 0)
    done = (qb - 1) % R  # the finished block's slot
    slot = done.view(B, 1, 1, 1).expand(B, C, 1, W)
    ring.scatter_(2, slot, torch.where(fresh.view(B, 1, 1, 1), current, ring.gather(2, slot)))
    current.copy_(row)
    slots = (qb[:, None] - R + torch.arange(R, device=pos.device)) % R  # blocks qb-R .. qb-1
    window = torch.cat([ring.gather(2, slots[:, None, :, None].expand(B, C, R, W)), row], dim=2)
    absent = torch.arange(R + 1, device=pos.device)[None, :] < (R - qb)[:, None]
    logits = rd.cnn_last_row(window, absent, w).float()  # (B, Hq, 1, K)
    Hq, K = logits.shape[1], logits.shape[3]
    logits.masked_fill_(rd.empty_bins(qb, K)[:, None, None, :], float("-inf"))
    return torch.log_softmax(logits, dim=-1).exp().view(B, num_kv_heads, Hq // num_kv_heads, K).mean(2)


def decode_select_block_row(probs: torch.Tensor, length: torch.Tensor, block_size: int, num_key_blocks: int,
                            per_head: int, density: float | None, sink_blocks: int, local_blocks: int, max_budget: int):
    """decode_select_blocks for block rows: the current block's row (B, Hkv, K) read per key block, then the
    same grouped top-k; the row counted in (length += 1). Returns (block_index (B, Hkv, MAXB), block_count
    (B, Hkv), kept (B, Hkv))."""
    from kernels import reference_decode as rd

    qb = length // block_size
    scores = block_scores_from_bins(probs[:, :, None], num_key_blocks, rows=qb[:, None])
    return rd.select_row_blocks(scores, length, block_size, per_head, density, sink_blocks, local_blocks, max_budget)
