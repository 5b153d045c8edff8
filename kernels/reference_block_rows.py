"""The block-row predictor's ops (`sea.predictor_rows: block`), in PyTorch: the specification.

With block rows, the predictor makes one estimate row per (query block, head) instead of one per
query. Its grid is the key blocks: row i (query block i) has n = i + 1 causal key blocks, and its K
bins split those n blocks the way a token row's bins split its keys (`kernels.bins.key_bins`
with key blocks for keys): below the cap (n <= K) each key block is its own bin; above it, a bin
holds ceil or floor of n / K blocks.

Every row of query block i reads the same estimate, made when the block opens: from the mean query
(and value) of the block_size rows ending at the block's first row, reading the keys up to that row.
So a block's estimate, selection and gates depend only on rows up to its first: a longer prefix never
changes an earlier row's output, and the decoder, which makes the row when the block's first token
arrives, computes what the full pass computes for every row (docs/decoding.md).
"""

from __future__ import annotations

import math

import torch

from kernels.bins import bin_starts, empty_bins, key_bins
from kernels.block_budget import BlockBudget
from kernels.reference_block_sparse import block_sparse_attention
from kernels.reference_decode_step import select_row_blocks
from kernels.reference_gates import kept_from_blocks, mix_gated, running_mean
from kernels.reference_predictor import cnn_last_row, decode_rows, encode_rows, positive_features
from kernels.reference_teacher_target import causal_scores_chunk


def opening_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, NQB, d) fp32: for each block, the mean of the block_size rows ending at its
    first row (rows i*bs - bs + 1 .. i*bs; fewer at the sequence's start): the previous block's sum less
    its first row, plus this block's first row. Rows after a block's first never enter: right pads (which
    follow the real rows) need no mask."""
    B, H, T, d = x.shape
    nb = math.ceil(T / block_size)
    padded = x if T == nb * block_size else torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - T))
    sums = padded.view(B, H, nb, block_size, d).sum(3, dtype=torch.float32)  # no fp32 copy of x
    first = x[:, :, ::block_size].float()  # (B, H, NQB, d)
    window = first.clone()
    window[:, :, 1:] += sums[:, :, :-1] - first[:, :, :-1]
    rows = (torch.arange(nb, device=x.device) * block_size + 1).clamp_max(block_size).float()
    return window / rows[:, None]


def block_linear_attention(q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor, block_size: int,
                           chunk_blocks: int = 8) -> torch.Tensor:
    """Causal linear attention read at each block's first row: row i is (qf_i . S_i) / (qf_i . z_i) with S_i,
    z_i the sums of kf_s v_s^T and kf_s over the keys s <= i * block_size.

    q_feat: (B, H, NQB, m) features of the block rows; k_feat: (B, Hk, T, m); v: (B, Hk, T, dv), Hk
    dividing H (GQA). Returns (B, H, NQB, dv) fp32 (pad keys, which follow the real ones, never enter).
    Chunked as linear attention usually is: states only at chunk boundaries (chunk_blocks blocks), inside
    a chunk the rows read their keys up to their first row through a masked (rows x keys) product; never
    a (NQB, m, dv) state per block."""
    B, H, R, m = q_feat.shape
    Hk, T = k_feat.shape[1], k_feat.shape[2]
    G, dv = H // Hk, v.shape[-1]
    C = min(chunk_blocks, R)
    NC = math.ceil(R / C)
    L = C * block_size  # keys per chunk
    kf, vv = ((x if x.shape[2] == NC * L else torch.nn.functional.pad(x, (0, 0, 0, NC * L - T))).float().view(B, Hk, NC, L, -1)
              for x in (k_feat, v))
    state = kf.transpose(-1, -2) @ vv  # (B, Hk, NC, m, dv): each chunk's sum of kf v^T
    norm = kf.sum(-2)  # (B, Hk, NC, m)
    before = state.cumsum(2) - state, norm.cumsum(2) - norm  # exclusive: the chunks before each
    qf = torch.nn.functional.pad(q_feat.float(), (0, 0, 0, NC * C - R)).view(B, Hk, G, NC, C, m)
    qf = qf.permute(0, 1, 3, 2, 4, 5).reshape(B, Hk, NC, G * C, m)  # rows (g, c) of each chunk
    row_block = torch.arange(C, device=qf.device).repeat(G)  # each row's block inside its chunk
    seen = torch.arange(L, device=qf.device)[None, :] <= row_block[:, None] * block_size  # up to the first row
    inside = (qf @ kf.transpose(-1, -2)) * seen  # (B, Hk, NC, G*C, L)
    num = qf @ before[0] + inside @ vv
    den = (qf @ before[1].unsqueeze(-1)).squeeze(-1) + inside.sum(-1)
    out = num / den.clamp_min(1e-30).unsqueeze(-1)  # (B, Hk, NC, G*C, dv)
    out = out.view(B, Hk, NC, G, C, dv).permute(0, 1, 3, 2, 4, 5).reshape(B, H, NC * C, dv)
    return out[:, :, :R]


def block_rows_estimate(q_feat: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_values: torch.Tensor,
                        projection: torch.Tensor, scale: float, block_size: int,
                        out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The block-row estimator from the raw keys and values: block_linear_attention over the keys' positive
    random features (stabiliser from each sequence's first key) and the values [v, position_values[:T]].

    q_feat (B, Hq, NQB, m) the block rows' query features; k, v (B, Hkv, T, d); position_values (L >= T, d);
    projection (m, d). Returns (B, Hq, NQB, 2d), computed in fp32, in out_dtype (the consumer's: a 16-bit one
    lets the Triton op compute in bf16). (On the GPU one kernel pair computes the features and
    reads the two halves of the values in place: no fp32 copy of the keys' features or of the values.)"""
    B, Hkv, T, d = v.shape
    k_feat = positive_features(k.float() * math.sqrt(scale), projection.float(), is_query=False)
    values = torch.cat([v.float(), position_values[:T].float().expand(B, Hkv, T, d)], dim=-1)
    return block_linear_attention(q_feat, k_feat, values, block_size).to(out_dtype)


def block_teacher_target(q: torch.Tensor, k: torch.Tensor, scale: float, K: int, block_size: int,
                         query_chunk: int = 256) -> torch.Tensor:
    """The teacher's attention on the block-row grid: for query block i, the mean over its rows of each
    row's attention mass per key block, pooled into row i's K bins of its i + 1 key blocks.

    Returns (B, Hq, NQB, K) fp32, rows sum to 1. Chunked over queries (whole blocks per chunk): never
    more than (B, Hq, chunk, T) scores, and no (NQB x NKB) tensor; the bins' sums take a (B, Hq, chunk / block_size,
    NKB, K) product per chunk (19 MB for the GPU recipe at 8k, 75 MB at 32k). No atomics: the same inputs give the
    same target on a GPU, run after run.
    """
    B, Hq, T, _ = q.shape
    nb = math.ceil(T / block_size)
    chunk = block_size * max(1, query_chunk // block_size)
    target = torch.zeros(B, Hq, nb, K, dtype=torch.float32, device=q.device)
    rows = (T - torch.arange(nb, device=q.device) * block_size).clamp_max(block_size).float()  # (NQB,) rows per block
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = causal_scores_chunk(q, k, t0, t1, scale)
        p = s.sub_(torch.logsumexp(s, dim=-1, keepdim=True)).exp_()  # (B, Hq, C, t1)
        nkb = math.ceil(t1 / block_size)
        per_block = torch.nn.functional.pad(p, (0, nkb * block_size - t1)).view(B, Hq, t1 - t0, nkb, block_size).sum(-1)
        b0, b1 = t0 // block_size, math.ceil(t1 / block_size)
        # sums, not index_add_/scatter_add_: on CUDA those add atomically in a varying order, so stage A's
        # targets (and its losses) differed at the ulp level from run to run, and a resumed run could not be
        # checked against an uninterrupted one. The chunk starts on a block boundary: its rows pad to whole blocks.
        rows_padded = (b1 - b0) * block_size
        mass = torch.nn.functional.pad(per_block, (0, 0, 0, rows_padded - (t1 - t0)))
        mass = mass.view(B, Hq, b1 - b0, block_size, nkb).sum(3)  # (B, Hq, blocks of the chunk, nkb)
        # each key block's bin as a one-hot per query block; the bins' sums are a product and a plain sum, not a
        # matmul, which TF32 (a user's float32_matmul_precision "high") would round to 10 bits
        bins = key_bins(torch.arange(b0, b1, device=q.device), nkb, K)  # (blocks, nkb)
        one_hot = torch.nn.functional.one_hot(bins, K).to(mass.dtype)  # (blocks, nkb, K)
        target[:, :, b0:b1] = (mass.unsqueeze(-1) * one_hot).sum(-2)
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
    bins = key_bins(i, num_key_blocks, K)  # each key block's bin in its row, key blocks for keys: (.., R, NKB)
    starts = bin_starts(i, K)
    width = (starts[..., 1:] - starts[..., :-1]).clamp_min(1).float().gather(-1, bins)
    future = j > i[..., None]
    if rows is not None:  # per sequence: broadcast over heads
        bins, width, future = bins[:, None], width[:, None], future[:, None]
    scores = probs.float().gather(-1, bins.expand(B, H, R, num_key_blocks)) / width
    return scores.masked_fill(future, float("-inf"))


def block_sparse_attention_gated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor,
                                 block_count: torch.Tensor, block_size: int, scale: float, gates: torch.Tensor,
                                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """block_sparse_attention, then the output gates (mix_gated) with one pair of gates per query block:
    gates (B, Hq, NQB, 2) fp32, the block rows' (every row of a block reads its block's). The keys each row
    attends come from the lists; the running mean of v from v. Returns (B, Hq, T, d) in out_dtype, computed in fp32
    and rounded once (the layer asks for the model's dtype at inference: the model rounds to it anyway).
    (On the GPU one kernel: the gates are applied in the attention's epilogue.)"""
    return gated_with(block_sparse_attention)(q, k, v, block_index, block_count, block_size, scale, gates, out_dtype)


def gated_with(attend):
    """block_sparse_attention_gated over another implementation of block_sparse_attention (the CPU's)."""

    def gated(q, k, v, block_index, block_count, block_size: int, scale: float, gates: torch.Tensor,
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        T = q.shape[2]
        out, _ = attend(q, k, v, block_index, block_count, block_size, scale)
        kept = kept_from_blocks(block_index, block_count, block_size, T)
        rows = torch.arange(1, T + 1, device=q.device, dtype=torch.float32)
        mixed = mix_gated(out, gates.repeat_interleave(block_size, dim=2)[:, :, :T], kept, running_mean(v), rows)
        return mixed.to(out_dtype)

    return gated


# ---------------------------------------------------------------------------
# decoding: the current query block's row, made when the block's first token arrives


def decode_block_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, shift: torch.Tensor,
                      kv: torch.Tensor, norm: torch.Tensor, v_sum: torch.Tensor, q_tail: torch.Tensor,
                      v_tail: torch.Tensor, w, scale: float, block_size: int) -> None:
    """What every new token adds to the block-row decoder's sums, in place: the new key's features into the
    estimator's kv (sum of kf^T [v, position]) and norm (sum of kf), v into v_sum, and q, v into the current
    block's tails (the rows after its first; a token that opens a block starts them empty). q (B, Hq, 1, d);
    k, v (B, Hkv, 1, d) at positions pos (B,). A token inside a block needs nothing else: its block's row,
    gates and selection were made when the block opened."""
    B, Hkv = k.shape[:2]
    fresh = (pos % block_size == 0).view(B, 1, 1, 1)
    q_tail.add_(q.float()).masked_fill_(fresh, 0.0)
    v_tail.add_(v.float()).masked_fill_(fresh, 0.0)
    kf = positive_features(k.float() * math.sqrt(scale), w.projection.float(), is_query=False, key_shift=shift)
    positions = w.position_values.float()[pos][:, None, None].expand(-1, Hkv, -1, -1)
    kv += kf.transpose(-1, -2) @ torch.cat([v.float(), positions], dim=-1)
    norm += kf[:, :, 0]
    v_sum += v.float()


def decode_block_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, shift: torch.Tensor,
                     kv: torch.Tensor, norm: torch.Tensor, v_sum: torch.Tensor, q_tail: torch.Tensor,
                     v_tail: torch.Tensor, block_gates: torch.Tensor | None, w, scale: float, block_size: int):
    """decode_predictor_rows for block rows: decode_block_sums, and the row of the block that the new token
    opens, made as the full pass makes it (opening_means, block_linear_attention): from the mean query and
    value of the block_size rows ending at the new one, reading the keys up to it.

    Updated in place as decode_block_sums; block_gates (B, Hq, 1, 2), the current block's gates, replaced
    where the token opens a block. Returns (the row's CNN input (B, Hq*C, 1, K/4), meaningful only where pos
    opens a block; block_gates)."""
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    fresh = (pos % block_size == 0).view(B, 1, 1, 1)
    rows = (pos + 1).clamp_max(block_size).float().view(B, 1, 1, 1)  # the opening window's rows
    q_open, v_open = (q_tail + q.float()) / rows, (v_tail + v.float()) / rows
    decode_block_sums(q, k, v, pos, shift, kv, norm, v_sum, q_tail, v_tail, w, scale, block_size)
    qf = positive_features(q_open * math.sqrt(scale), w.projection.float(), is_query=True)
    qf = qf.view(B, Hkv, Hq // Hkv, -1)  # reads the keys up to the new one, as linear_attention_step
    lin = ((qf @ kv) / (qf @ norm.unsqueeze(-1)).clamp_min(1e-30)).view(B, Hq, 1, -1)
    wdtype = w.dec_weight.dtype
    h = encode_rows(lin.to(wdtype), v_open.to(wdtype), Hq // Hkv, w)
    if block_gates is not None:
        gates = torch.nn.functional.linear(h, w.gate_weight, w.gate_bias).float()
        block_gates.copy_(torch.where(fresh, gates, block_gates))
    return decode_rows(h, w), block_gates


def decode_block_cnn_probs(ring: torch.Tensor, current: torch.Tensor, row: torch.Tensor, pos: torch.Tensor,
                           block_size: int, w, probs: torch.Tensor) -> torch.Tensor:
    """decode_cnn_probs for block rows. ring (B, Hq*C, R, K/4): the CNN input rows of the R = receptive rows - 1
    complete blocks before the current one (block b in slot b % R); current (B, Hq*C, 1, K/4): the current
    block's row; probs (B, Hkv, K): its probabilities, pooled over each KV head's query heads. Where the token
    at pos (B,) opens a block, `row` is the new block's row: the finished block's row moves into the ring,
    `current` becomes `row` and `probs` its probabilities (all in place). Returns probs."""
    B, C, R, W = ring.shape
    Hkv = probs.shape[1]
    qb = pos // block_size
    opens = pos % block_size == 0
    done = (qb - 1) % R  # the finished block's slot
    slot = done.view(B, 1, 1, 1).expand(B, C, 1, W)
    ring.scatter_(2, slot, torch.where((opens & (qb > 0)).view(B, 1, 1, 1), current, ring.gather(2, slot)))
    current.copy_(torch.where(opens.view(B, 1, 1, 1), row, current))
    slots = (qb[:, None] - R + torch.arange(R, device=pos.device)) % R  # blocks qb-R .. qb-1
    window = torch.cat([ring.gather(2, slots[:, None, :, None].expand(B, C, R, W)), row], dim=2)
    absent = torch.arange(R + 1, device=pos.device)[None, :] < (R - qb)[:, None]
    logits = cnn_last_row(window, absent, w).float()  # (B, Hq, 1, K)
    Hq, K = logits.shape[1], logits.shape[3]
    logits.masked_fill_(empty_bins(qb, K)[:, None, None, :], float("-inf"))
    new = torch.log_softmax(logits, dim=-1).exp().view(B, Hkv, Hq // Hkv, K).mean(2)
    return probs.copy_(torch.where(opens.view(B, 1, 1), new, probs))


def decode_select_block_row(probs: torch.Tensor, length: torch.Tensor, block_size: int, num_key_blocks: int,
                            budget: BlockBudget, max_budget: int):
    """decode_select_blocks for block rows: the current block's probabilities (B, Hkv, K) read per key block, then the
    same grouped top-k; the row counted in (length += 1). Returns (block_index (B, Hkv, MAXB), block_count
    (B, Hkv), kept (B, Hkv))."""
    qb = length // block_size
    scores = block_scores_from_bins(probs[:, :, None], num_key_blocks, rows=qb[:, None])
    return select_row_blocks(scores, length, block_size, budget, max_budget)
