"""Reference of the fused decode step's ops (kernels.decode_step_rows, decode_step_cnn, decode_step_select,
decode_step_mix: same signatures, same outputs).

A decode step (sea_convert.attention.decode) is five ops:
1. decode_predictor_rows: the estimator's running-sum update and its new row, the encoder, the row
   decoder and the gates (per KV head);
2. decode_cnn_probs: the causal CNN's new row from its ring of input rows, the estimate's
   softmax and its pooling over each KV head's query heads;
3. decode_select_blocks: the current query block's pooled estimate, spread over key blocks, and
   the grouped top-k (block mode);
4. sparse_decode_attention (kernels.reference_sparse_decode);
5. decode_mix_output: the output gates (kernels.reference_gates).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.bins import empty_bins
from kernels.block_budget import BlockBudget
from kernels.reference_gates import kept_from_blocks_row
from kernels.reference_linear_attention import linear_attention_step
from kernels.reference_predictor import CNNWeights, RowWeights, cnn_last_row, decode_rows, encode_rows, positive_features
from kernels.reference_select import select_key_blocks, spread_bins_to_key_blocks


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
    lin = linear_attention_step(qf, kf, torch.cat([v.float(), positions], dim=-1), kv, norm)  # (B, Hq, 1, 2d)
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
    scores = spread_bins_to_key_blocks(pooled[:, :, None], (pos + 1)[:, None].float(), bs, num_key_blocks)
    return select_row_blocks(scores, length, bs, budget, max_budget)


def select_row_blocks(scores: torch.Tensor, length: torch.Tensor, block_size: int, budget: BlockBudget,
                      max_budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's selection for the new row of each sequence from its block scores (B, Hkv, 1, NKB)
    (future blocks are masked here), and the row counted in: length += 1. See decode_select_blocks."""
    B, num_key_blocks = scores.shape[0], scores.shape[-1]
    pos = length.clone()
    qb = pos // block_size
    future = torch.arange(num_key_blocks, device=scores.device)[None, None, None, :] > qb.view(B, 1, 1, 1)
    index, count = select_key_blocks(scores.masked_fill(future, float("-inf")), budget, block_pos=qb[:, None],
                                     max_budget=max_budget)
    index, count = index[:, :, 0], count[:, :, 0]
    kept = kept_from_blocks_row(index, count, block_size, pos)
    length.add_(1)
    return index, count, kept
