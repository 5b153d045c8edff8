"""Reference of kernels.linear_attention: causal linear attention (the estimator's cost-O(T) part),
whole sequences and one new position from the running state (decoding)."""

from __future__ import annotations

import torch


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
