"""Reference of the fused decode step: the predictor's per-token math as plain functions of its weights.

A decode step (sea_convert.attention.decode) is five ops, each one Triton kernel in
`kernels.decode_step` with the same signature as here:
1. decode_predictor_rows: the estimator's running-sum update and its new row, the encoder, the row
   decoder and the gates (per KV head);
2. decode_cnn_probs: the causal CNN's new row from its ring of input rows, the estimate's
   softmax and its pooling over each KV head's query heads;
3. decode_select_blocks: the current query block's pooled estimate, spread over key blocks, and
   the grouped top-k (block mode);
4. sparse_decode_attention (kernels.reference);
5. decode_mix_output: the output gates.

The predictor's modules (sea_convert.attention) compute with these same functions
(positive_features, encode_rows, cnn_forward, ...), so the prefill and the decoder share one
arithmetic: token-by-token decoding equals a full re-run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import reference as ops  # a module object: kernels.reference imports this module's ops at its end
from kernels.block_budget import BlockBudget


class RowWeights(NamedTuple):
    """The row-local part of one layer's predictor (estimator, encoder, row decoder, gates)."""

    projection: torch.Tensor  # (F, d) random features
    position_values: torch.Tensor  # (table, d) learned positional values
    enc_weight: torch.Tensor  # (hidden, 3d): [lin (2d), v (d)] -> hidden
    enc_bias: torch.Tensor
    ln_weight: torch.Tensor  # (hidden,)
    ln_bias: torch.Tensor
    ln_eps: float
    dec_weight: torch.Tensor  # (C * K/4, hidden)
    dec_bias: torch.Tensor
    gate_weight: torch.Tensor | None  # (2, hidden), None without output gates
    gate_bias: torch.Tensor | None
    channels: int  # C, the CNN's channels per head


class CNNWeights(NamedTuple):
    """The causal CNN: two dilated 3x3 convolutions, a 1x1 to one channel per head, LayerNorm over K."""

    conv1_weight: torch.Tensor  # (Hq*C, Hq*C, 3, 3), dilation 1
    conv1_bias: torch.Tensor
    conv2_weight: torch.Tensor  # dilation 2
    conv2_bias: torch.Tensor
    head_weight: torch.Tensor  # (Hq, Hq*C, 1, 1)
    head_bias: torch.Tensor
    ln_weight: torch.Tensor  # (K,)
    ln_bias: torch.Tensor
    ln_eps: float


CNN_RECEPTIVE_ROWS = 1 + 2 * 1 + 2 * 2  # rows t-6..t feed row t


# ---------------------------------------------------------------------------
# the predictor's math


def positive_features(x: torch.Tensor, projection: torch.Tensor, is_query: bool, key_shift: torch.Tensor | None = None) -> torch.Tensor:
    """phi(x) = exp(w.x - |x|^2/2 - c): E[phi(q).phi(k)] is proportional to exp(q.k).

    The stabiliser c cancels in the estimator's ratio as long as it is shared by every key
    a query sees: per row for queries; for keys, per (batch, head) and taken from the first key
    alone, which every row sees (`key_shift`; the decoder keeps it from the prefill). A max over
    all keys would let a later key change earlier rows (through the 1e-6 floor): not causal, and
    not reproducible token by token when decoding.
    """
    wx = x @ projection.T
    half_sq = 0.5 * (x * x).sum(-1, keepdim=True)
    if is_query:
        c = wx.amax(-1, keepdim=True)
    else:
        c = key_shift if key_shift is not None else wx[..., :1, :].amax(-1, keepdim=True)
    return torch.exp(wx - half_sq - c.detach()) + 1e-6


def encode_rows(lin: torch.Tensor, v: torch.Tensor, G: int, w: RowWeights) -> torch.Tensor:
    """encoder([lin, v]) = GELU(LayerNorm(Linear)), lin (B, Hq, T, 2d), v (B, Hkv, T, d), without
    repeating v to the query heads: its part of the Linear is computed once per KV head and
    broadcast over the group (same weights, same result)."""
    d2 = lin.shape[-1]
    x = F.linear(lin, w.enc_weight[:, :d2], w.enc_bias)
    B, Hq, T, hidden = x.shape
    xv = F.linear(v, w.enc_weight[:, d2:])  # (B, Hkv, T, hidden)
    x = (x.view(B, Hq // G, G, T, hidden) + xv.unsqueeze(2)).view(B, Hq, T, hidden)
    return F.gelu(F.layer_norm(x, (hidden,), w.ln_weight, w.ln_bias, w.ln_eps))


def decode_rows(h: torch.Tensor, w: RowWeights) -> torch.Tensor:
    """Encoder states (B, Hq, T, hidden) -> the CNN's input image (B, Hq*C, T, K/4)."""
    B, Hq, T, _ = h.shape
    rows = F.linear(h, w.dec_weight, w.dec_bias).view(B, Hq, T, w.channels, -1)
    # laid out channels-last (B, T, K/4, Hq*C) in memory: the convolutions run 2-4x faster on it
    # than on (B, Hq*C, T, K/4) on the CPU, and the one copy this takes is needed either way
    image = rows.permute(0, 2, 4, 1, 3).reshape(B, T, rows.shape[-1], Hq * w.channels)
    return image.permute(0, 3, 1, 2)


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int) -> torch.Tensor:
    """A 3x3 convolution that is causal along time (padding on top only), same width. The convolution
    pads both ends itself (no padded copy of the image) and the rows its bottom padding adds are dropped."""
    T = x.shape[-2]
    return F.conv2d(x, weight, bias, padding=(2 * dilation, dilation), dilation=dilation)[..., :T, :]


def cnn_forward(x: torch.Tensor, w: CNNWeights) -> torch.Tensor:
    """The CNN over a whole (B, Hq*C, T, K/4) image -> logits (B, Hq, T, K)."""
    x = x + F.relu(_causal_conv(x, w.conv1_weight, w.conv1_bias, 1))
    x = x + F.relu(_causal_conv(x, w.conv2_weight, w.conv2_bias, 2))
    return cnn_out(x, w)


def cnn_last_row(window: torch.Tensor, absent: torch.Tensor, w: CNNWeights) -> torch.Tensor:
    """cnn_forward's output for the last row of `window` (B, C, CNN_RECEPTIVE_ROWS, W): the rows
    that feed it. absent (B, rows) marks rows before the sequence's start: zero, as cnn_forward's
    padding is, at the input of both convolutions."""
    gone = absent[:, None, :, None]
    x = window.masked_fill(gone, 0.0)
    x = (x + F.relu(_causal_conv(x, w.conv1_weight, w.conv1_bias, 1))).masked_fill(gone, 0.0)
    x = x + F.relu(_causal_conv(x, w.conv2_weight, w.conv2_bias, 2))
    return cnn_out(x[:, :, -1:], w)


def cnn_out(x: torch.Tensor, w: CNNWeights) -> torch.Tensor:
    """LayerNorm(to_heads(upsample_x4(x))) over K, computed at width K/4: a 1x1 conv commutes with
    nearest upsampling, and a row repeated 4 times has the same mean and variance. 4x less work."""
    y = F.layer_norm(F.conv2d(x, w.head_weight, w.head_bias).contiguous(), (x.shape[-1],), eps=w.ln_eps)
    return torch.addcmul(w.ln_bias, y.repeat_interleave(4, dim=-1), w.ln_weight)


def empty_bins(rows: torch.Tensor, K: int) -> torch.Tensor:
    """Bins holding no key for rows at positions `rows` (any shape S): (S.., K) bool."""
    starts = ops.bin_starts(rows, K)
    return starts[..., 1:] == starts[..., :-1]


def kept_from_blocks(block_index: torch.Tensor, block_count: torch.Tensor, block_size: int, T: int) -> torch.Tensor:
    """Keys kept per row: full blocks before the row's own block, plus the causal part of its own block."""
    nqb = block_index.shape[2]
    i = torch.arange(nqb, device=block_index.device).view(1, 1, nqb, 1)
    valid = torch.arange(block_index.shape[-1], device=block_index.device) < block_count.unsqueeze(-1)
    full = (valid & (block_index < i)).sum(-1)  # (B, Hkv, NQB)
    diag = (valid & (block_index == i)).any(-1)
    rows = torch.arange(T, device=block_index.device)
    qb = rows // block_size
    return full[..., qb] * block_size + diag[..., qb] * (rows - qb * block_size + 1)


def kept_from_blocks_row(block_index: torch.Tensor, block_count: torch.Tensor, block_size: int, pos: torch.Tensor) -> torch.Tensor:
    """Keys kept by one row per sequence at position pos (B,): block lists (B, Hkv, MAXB) -> (B, Hkv).
    Full blocks before the row's own block, plus the causal part of its own block."""
    qb = (pos // block_size)[:, None, None]
    valid = torch.arange(block_index.shape[-1], device=block_index.device) < block_count.unsqueeze(-1)
    full = (valid & (block_index < qb)).sum(-1)
    diag = (valid & (block_index == qb)).any(-1)
    return full * block_size + diag * (pos % block_size + 1)[:, None]


def running_mean(v: torch.Tensor) -> torch.Tensor:
    """Causal running mean of v along time, fp32 (the scan runs along the contiguous axis: faster on GPU)."""
    T = v.shape[-2]
    count = torch.arange(1, T + 1, device=v.device, dtype=torch.float32)
    return (v.float().transpose(-1, -2).contiguous().cumsum(-1) / count).transpose(-1, -2)


def mix_gated(sparse_out: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor, mean_v: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:
    """The paper's output gates, tied to what the selection left out.

    sparse_out (B, Hq, T, d); gates (B, Hq, T, 2); kept (B, Hkv, T) keys attended; mean_v
    (B, Hkv, T, d) the running mean of v; rows: t+1, broadcastable to kept. u = 1 - kept / (t+1) is
    the share of causal keys not attended. The probability scale is 1 + (2 sigmoid(s0) - 1) u and
    the weight of the running mean of v is sigmoid(s1) u: with every causal key kept (u = 0) the
    output is exactly dense attention, whatever the gates learned.
    """
    B, Hq, T, d = sparse_out.shape
    Hkv = kept.shape[1]
    G = Hq // Hkv
    # per KV head, broadcast over its G query heads (no repeat_interleave copies)
    u = (1.0 - kept.float() / rows).clamp_min(0.0).view(B, Hkv, 1, T, 1)
    s0, s1 = gates.view(B, Hkv, G, T, 2).unbind(-1)
    w = torch.sigmoid(s1.unsqueeze(-1)) * u
    sparse_weight = (1.0 - w) * (1.0 + (2.0 * torch.sigmoid(s0.unsqueeze(-1)) - 1.0) * u)
    out = sparse_weight * sparse_out.float().view(B, Hkv, G, T, d) + w * mean_v.unsqueeze(2)
    return out.view(B, Hq, T, d)


# ---------------------------------------------------------------------------
# the decode step's ops


def decode_predictor_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, shift: torch.Tensor,
    kv: torch.Tensor, norm: torch.Tensor, v_sum: torch.Tensor, w: RowWeights, scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The new position of each sequence through the row-local predictor.

    q (B, Hq, 1, d); k, v (B, Hkv, 1, d) the new key and value; pos (B,) their positions (inside
    the position table). The running state, updated in place: kv (B, Hkv, F, 2d) and norm
    (B, Hkv, F) the estimator's sums of kf^T [v, position] and kf; v_sum (B, Hkv, 1, d) the sum of v.
    shift (B, Hkv, 1, 1) the keys' feature stabiliser. Returns (the CNN's new input row
    (B, Hq*C, 1, K/4) in the weights' dtype, gates (B, Hq, 1, 2) fp32 or None).
    """
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    root, proj = math.sqrt(scale), w.projection.float()
    qf = positive_features(q.float() * root, proj, is_query=True)
    kf = positive_features(k.float() * root, proj, is_query=False, key_shift=shift)
    positions = w.position_values.float()[pos][:, None, None].expand(-1, Hkv, -1, -1)
    lin = ops.linear_attention_step(qf, kf, torch.cat([v.float(), positions], dim=-1), kv, norm)  # (B, Hq, 1, 2d)
    v_sum += v.float()
    wdtype = w.dec_weight.dtype
    h = encode_rows(lin.to(wdtype), v.to(wdtype), Hq // Hkv, w)
    gates = F.linear(h, w.gate_weight, w.gate_bias).float() if w.gate_weight is not None else None
    return decode_rows(h, w), gates


def decode_cnn_probs(image: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, w: CNNWeights, num_kv_heads: int) -> torch.Tensor:
    """The new row's estimate, pooled over each KV head's query heads.

    image (B, Hq*C, R, K/4) with R = CNN_RECEPTIVE_ROWS - 1: a ring of the CNN's last R input rows,
    the row at position p in slot p % R (zeros before the sequence's start). row (B, Hq*C, 1, K/4)
    the new row, at positions pos (B,); it takes the slot of the row R back (updated in place).
    Returns probabilities (B, Hkv, K) fp32: softmax over the K bins (empty bins 0) averaged over the
    G query heads of each KV head.
    """
    B, C, R, W = image.shape
    slots = (pos[:, None] + torch.arange(R, device=pos.device)) % R  # positions pos-R .. pos-1
    window = torch.cat([image.gather(2, slots[:, None, :, None].expand(B, C, R, W)), row], dim=2)
    image.scatter_(2, (pos % R).view(B, 1, 1, 1).expand(B, C, 1, W), row)
    absent = torch.arange(R + 1, device=pos.device)[None, :] < (R - pos)[:, None]
    logits = cnn_last_row(window, absent, w).float()  # (B, Hq, 1, K)
    Hq, K = logits.shape[1], logits.shape[3]
    logits.masked_fill_(empty_bins(pos, K)[:, None, None, :], float("-inf"))
    return torch.log_softmax(logits, dim=-1).exp().view(B, num_kv_heads, Hq // num_kv_heads, K).mean(2)


def decode_select_blocks(
    probs: torch.Tensor, block_sum: torch.Tensor, length: torch.Tensor, block_size: int, num_key_blocks: int,
    budget: BlockBudget, max_budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-mode selection for the new row of each sequence, and the row counted in: length += 1.

    probs (B, Hkv, K) the row's pooled estimate; length (B,) keys before the row (so the row's
    position); block_sum (B, Hkv, K) the sum of the current query block's rows before this one,
    updated in place (reset when the row opens a new block). The block's rows pooled (their mean,
    what the prefill pools for a partial last block) are spread over key blocks 0..num_key_blocks-1
    (future ones masked) and select_key_blocks keeps the grouped top-k: budget.blocks(query block) per
    KV head, sink and local blocks forced. max_budget: the host's bound on the total budget, which
    fixes the lists' width MAXB = min(num_key_blocks, max_budget).
    Returns (block_index (B, Hkv, MAXB) int32 sorted and -1 padded, block_count (B, Hkv) int32,
    kept (B, Hkv) keys the row attends to).
    """
    B = probs.shape[0]
    pos = length.clone()
    bs = block_size
    fresh = (pos % bs == 0).view(B, 1, 1)  # a new query block starts: forget the last one's rows
    block_sum.masked_fill_(fresh, 0.0).add_(probs)
    pooled = block_sum / (pos % bs + 1).view(B, 1, 1).float()
    scores = ops.spread_bins_to_key_blocks(pooled[:, :, None], (pos + 1)[:, None].float(), bs, num_key_blocks)
    return select_row_blocks(scores, length, bs, budget, max_budget)


def select_row_blocks(scores: torch.Tensor, length: torch.Tensor, block_size: int, budget: BlockBudget,
                      max_budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's selection for the new row of each sequence from its block scores (B, Hkv, 1, NKB)
    (future blocks are masked here), and the row counted in: length += 1. See decode_select_blocks."""
    B, num_key_blocks = scores.shape[0], scores.shape[-1]
    pos = length.clone()
    qb = pos // block_size
    future = torch.arange(num_key_blocks, device=scores.device)[None, None, None, :] > qb.view(B, 1, 1, 1)
    index, count = ops.select_key_blocks(scores.masked_fill(future, float("-inf")), budget, block_pos=qb[:, None],
                                         max_budget=max_budget)
    index, count = index[:, :, 0], count[:, :, 0]
    kept = kept_from_blocks_row(index, count, block_size, pos)
    length.add_(1)
    return index, count, kept


def decode_mix_output(sparse_out: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor, v_sum: torch.Tensor,
                      length: torch.Tensor) -> torch.Tensor:
    """mix_gated for the new row of each sequence: sparse_out (B, Hq, 1, d), gates (B, Hq, 1, 2),
    kept (B, Hkv), v_sum (B, Hkv, 1, d) over the length (B,) keys so far (the new one included).
    Returns (B, Hq, 1, d) fp32."""
    n = length.float().view(-1, 1, 1)
    return mix_gated(sparse_out, gates, kept[..., None], v_sum / n.unsqueeze(-1), n)


def sparse_decode_mixed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_count: torch.Tensor,
    block_size: int, scale: float, start: torch.Tensor, length: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor,
    v_sum: torch.Tensor,
) -> torch.Tensor:
    """The block mode's last two ops as one: sparse_decode_attention (output in q's dtype), then
    decode_mix_output with gates (B, Hq, 1, 2), kept (B, Hkv), v_sum (B, Hkv, 1, d) over length (B,)
    keys. (On the GPU the gates are applied where the splits are combined: one launch less.)
    Returns (B, Hq, 1, d) fp32."""
    out, _ = ops.sparse_decode_attention(q, k, v, block_index, block_count, block_size, scale, start, length)
    return decode_mix_output(out, gates, kept, v_sum, length)
