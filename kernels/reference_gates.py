"""Reference of the output gates that kernels.block_sparse_attention (gated), kernels.sparse_decode (mixed)
and the decode step's mix kernel apply: the keys each row kept, the running mean of v, the mix."""

from __future__ import annotations

import torch


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


def decode_mix_output(sparse_out: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor, v_sum: torch.Tensor,
                      length: torch.Tensor) -> torch.Tensor:
    """mix_gated for the new row of each sequence: sparse_out (B, Hq, 1, d), gates (B, Hq, 1, 2),
    kept (B, Hkv), v_sum (B, Hkv, 1, d) over the length (B,) keys so far (the new one included).
    Returns (B, Hq, 1, d) fp32."""
    n = length.float().view(-1, 1, 1)
    return mix_gated(sparse_out, gates, kept[..., None], v_sum / n.unsqueeze(-1), n)
