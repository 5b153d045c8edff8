"""Block-sparse SEA attention for the CPU that computes only the selected key blocks.

Why this exists: `kernels.reference_block_sparse.block_sparse_attention` is the specification. It builds a
dense (query x key) score matrix per chunk and masks it, so on the CPU, where no Triton kernel
runs, SEA attention cost more than dense attention (an eval at 2k context was slower with SEA
than without). Here each query block gathers only its listed key blocks' keys and values (one
`index_select` per chunk of query blocks) and attends over those: the work per query is
(kept blocks x block_size) keys, not its whole prefix. The causal mask is by position, so it
only bites in the diagonal block (and on the -1 padding of the lists and the padded tail).

Without gradients (evaluation, generation) the attention over the gathered keys runs in PyTorch's
fused CPU flash-attention op (the one `scaled_dot_product_attention` uses on the CPU, called
directly because it also returns the log-sum-exp). With gradients, and where that op is missing,
a plain matmul-softmax-matmul does the same: the fused op's backward ignores the log-sum-exp's
gradient, which the reference's autograd gives.

Same signature and results as the reference (up to float summation order), differentiable like it,
so the CPU's distillation can use it too.
`kernels.dispatch` picks it on the CPU; tests/test_cpu_block_sparse.py checks it against the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# fp32 score elements per chunk of query blocks (query heads x rows x gathered keys): 2M = 8 MB (plus the
# gathered keys and values). Measured on 1 core (SmolLM2-135M's layer, T = 2k-4k): 256k-1M chunks ran
# ~10% faster than 4M; on cores shared with other work, fewer chunks (fewer parallel ops) win.
_CHUNK_ELEMENTS = 1 << 21

_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (N, G, L, d) (already scaled) over k, v (N, 1, S, d), additive bias (N, 1, L, S)
    (0 or -inf). Returns (out (N, G, L, d), lse (N, G, L)); a row with no allowed key gets out 0."""
    N, G, L, d = q.shape
    S = k.shape[2]
    if fused:
        out, lse = _flash(q, k.expand(N, G, S, d), v.expand(N, G, S, d), 0.0, False, attn_mask=bias, scale=1.0)
        return out, lse
    s = q @ k.transpose(-1, -2) + bias
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # a row with no key: exp(-inf) = 0 everywhere
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    out = (p @ v) / den.clamp_min(1e-30)
    return out, (m + torch.log(den)).squeeze(-1)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.reference_block_sparse.block_sparse_attention` (same arguments, outputs and fp32 arithmetic), over the
    listed key blocks only; a row with no key gets a zero output and an lse of -inf."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    bs = block_size
    nb = math.ceil(T / bs)  # query blocks = key blocks
    maxb = block_index.shape[-1]
    S = maxb * bs  # gathered keys per query block (padding slots masked)
    dev = q.device
    pad = nb * bs - T
    # keys/values as rows of whole blocks (B * Hkv * NB, bs * d); queries per unit u = (b, kv head, query
    # block), flattened in that order: (U, G, bs, d), pre-scaled. Chunks are runs of units (contiguous slices).
    U = B * Hkv * nb
    kb = F.pad(k.float(), (0, 0, 0, pad)).reshape(U, bs * d)
    vb = F.pad(v.float(), (0, 0, 0, pad)).reshape(U, bs * d)
    qb = F.pad(q.float() * scale, (0, 0, 0, pad)).view(B, Hkv, G, nb, bs, d).transpose(2, 3).reshape(U, G, bs, d)

    idx = block_index[:, :, :nb].long()
    listed = (torch.arange(maxb, device=dev) < block_count[:, :, :nb, None]) & (idx >= 0)  # (B, Hkv, NB, MAXB)
    idx = torch.where(listed, idx, 0)
    rows_of = (idx + (torch.arange(B * Hkv, device=dev) * nb).view(B, Hkv, 1, 1)).view(U * maxb)  # rows of kb / vb
    # position of every gathered key; an unlisted slot lies past every row, so the causal test drops it
    key_pos = (idx[..., None] * bs + torch.arange(bs, device=dev)).masked_fill(~listed[..., None], nb * bs).view(U, 1, S)
    row_pos = ((torch.arange(U, device=dev) % nb) * bs).view(U, 1) + torch.arange(bs, device=dev)  # (U, bs)
    no_key = key_pos[:, 0].amin(-1, keepdim=True) > row_pos  # (U, bs): every gathered key after the row

    fused = _flash is not None and not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    # few, large ops per chunk: on shared cores every parallel op waits for its threads to be scheduled
    step = max(1, _CHUNK_ELEMENTS // (G * bs * S))
    neg_inf = torch.tensor(float("-inf"), device=dev)
    outs, lses = [], []
    for u0 in range(0, U, step):
        u1 = min(U, u0 + step)
        n = u1 - u0
        rows = rows_of[u0 * maxb : u1 * maxb]
        kg = kb.index_select(0, rows).view(n, 1, S, d)
        vg = vb.index_select(0, rows).view(n, 1, S, d)
        bias = torch.where(key_pos[u0:u1] > row_pos[u0:u1, :, None], neg_inf, 0.0).view(n, 1, bs, S)
        out, lse = _attend(qb[u0:u1], kg, vg, bias, fused)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs).view(B, Hkv, nb, G, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, nb * bs, d)[:, :, :T]
    lse = torch.cat(lses).masked_fill(no_key[:, None, :], float("-inf"))  # the fused op gives 0 there
    lse = lse.view(B, Hkv, nb, G, bs).permute(0, 1, 3, 2, 4).reshape(B, Hq, nb * bs)[:, :, :T]
    return out.to(q.dtype), lse.contiguous()
