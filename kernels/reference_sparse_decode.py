"""Reference of kernels.sparse_decode: one new query per sequence against a KV cache, over its selected
key blocks (or bins), and the block mode's attention and output gates as one op."""

from __future__ import annotations

import math

import torch

from kernels.reference_gates import decode_mix_output


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


def sparse_decode_mixed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_count: torch.Tensor,
    block_size: int, scale: float, start: torch.Tensor, length: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor,
    v_sum: torch.Tensor,
) -> torch.Tensor:
    """The block mode's last two ops as one: sparse_decode_attention (output in q's dtype), then
    decode_mix_output with gates (B, Hq, 1, 2), kept (B, Hkv), v_sum (B, Hkv, 1, d) over length (B,)
    keys. (On the GPU the gates are applied where the splits are combined: one launch less.)
    Returns (B, Hq, 1, d) fp32."""
    out, _ = sparse_decode_attention(q, k, v, block_index, block_count, block_size, scale, start, length)
    return decode_mix_output(out, gates, kept, v_sum, length)
