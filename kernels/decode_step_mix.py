"""The decode step's output gates in Triton (decode_mix_output), one program per (sequence, KV head): the
per-query mode's (block mode applies them where kernels.sparse_decode combines its splits).

Contract: `kernels.reference_decode_step` (same signature, same outputs; the reference is the math
the prefill runs, so decoding on these kernels continues a prefill as a full re-run would).
Decoding one token is launch-bound: each kernel is one program per sequence (or per KV head, query
head, block of channels) that keeps its rows in registers. A step's ops, one module each:
kernels.decode_step_rows, decode_step_cnn, decode_step_select, sparse_decode, decode_step_mix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels.sparse_decode import gate_weights


@triton.jit
def _mix_kernel(
    SparseOut, Gates, Kept, VSum, Length, Out, sob, soh, sod, Hkv,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // Hkv
    g = tl.arange(0, GP)
    g_ok = g < G
    dc = tl.arange(0, BD)
    d_ok = dc < D
    head = pid * G + g  # = b * Hq + hk * G + g
    nf = tl.load(Length + b).to(tl.float32)
    s0 = tl.load(Gates + head * 2, mask=g_ok, other=0.0)
    s1 = tl.load(Gates + head * 2 + 1, mask=g_ok, other=0.0)
    sparse_weight, w = gate_weights(s0, s1, tl.load(Kept + pid).to(tl.float32), nf)
    m2 = g_ok[:, None] & d_ok[None, :]
    so = tl.load(SparseOut + b * sob + (head - b * Hkv * G)[:, None] * soh + dc[None, :] * sod, mask=m2, other=0.0)
    mean_v = tl.load(VSum + pid * D + dc, mask=d_ok, other=0.0) / nf
    out = sparse_weight[:, None] * so.to(tl.float32) + w[:, None] * mean_v[None, :]
    tl.store(Out + head[:, None] * D + dc[None, :], out, mask=m2)


@torch.compiler.disable
def decode_mix_output(sparse_out: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor, v_sum: torch.Tensor,
                      length: torch.Tensor) -> torch.Tensor:
    B, Hq, _, d = sparse_out.shape
    Hkv = kept.shape[1]
    G = Hq // Hkv
    out = torch.empty(B, Hq, 1, d, dtype=torch.float32, device=sparse_out.device)
    _mix_kernel[(B * Hkv,)](
        sparse_out, gates.contiguous(), kept.contiguous(), v_sum.contiguous(), length.contiguous(), out,
        sparse_out.stride(0), sparse_out.stride(1), sparse_out.stride(3), Hkv,
        G=G, GP=triton.next_power_of_2(G), D=d, BD=triton.next_power_of_2(d), num_warps=4,
    )
    return out
