"""The decode step's predictor rows in Triton (decode_predictor_rows): the estimator's step, then the
encoder, row decoder and gates of the new row.

Contract: `kernels.reference_decode_step` (same signature, same outputs; the reference is the math
the prefill runs, so decoding on these kernels continues a prefill as a full re-run would).
Decoding one token is launch-bound: each kernel is one program per sequence (or per KV head, query
head, block of channels) that keeps its rows in registers. A step's ops, one module each:
kernels.decode_step_rows, decode_step_cnn, decode_step_select, sparse_decode, decode_step_mix.

The estimator runs per (sequence, KV head, column chunk of [v, position]): the key's random features
update the running sums (F x 2d, fp32, each chunk read and written once) and the G query heads read
them; then the encoder, row decoder and gates per (sequence, query head). (One program per KV head
doing all of it took 420 us on an H100: too few programs, too large tiles.)
Dots on fp32 inputs run in IEEE fp32 (the estimator's sums and fp32 models); on 16-bit weights
the activations are rounded to the weights' dtype before each product, as the reference does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels.reference_predictor import RowWeights
from kernels.tiles import pow2

# weight elements per round of the encoder's row-times-matrix products (64 fp32 registers a thread at
# ENC_WARPS): fewer, larger rounds of loads. H100, hidden 256: 8192 at 8 warps (12 + 4 rounds) 10.2 us,
# 16384 at 8 warps (6 + 2 rounds) 7.8 us, 32768 at 16 warps (3 + 1 rounds) 7.6 us
ENC_TILE, ENC_WARPS = 32768, 16


@triton.jit
def _estimator_kernel(
    Q, Kn, Vn, Pos, Shift, KV, Norm, Proj, PosTable, Lin, KfOut,
    sqb, sqh, sqd, skb, skh, skd, svb, svh, svd,
    Hkv, root,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, NF: tl.constexpr, FP: tl.constexpr,
    DC: tl.constexpr,
):
    """Columns [chunk * DC, chunk * DC + DC) of [v, position]: the running sum kf^T value (updated in
    place) and the G query heads' rows of the estimator's output. Every program computes the features
    (cheap); the norm is read here and updated by the encoder kernel, after every program here ran."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    g = tl.arange(0, GP)
    g_ok = g < G
    dc = tl.arange(0, BD)
    d_ok = dc < D
    f = tl.arange(0, FP)
    f_ok = f < NF
    pos = tl.load(Pos + b)
    proj = tl.load(Proj + f[:, None] * D + dc[None, :], mask=f_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    k = tl.load(Kn + b * skb + hk * skh + dc * skd, mask=d_ok, other=0.0).to(tl.float32) * root
    kf = tl.exp(tl.sum(proj * k[None, :], 1) - 0.5 * tl.sum(k * k, 0) - tl.load(Shift + pid)) + 1e-6
    kf = tl.where(f_ok, kf, 0.0)
    # the queries' projections one head at a time (row reductions: no (F x d) dot operand in shared memory)
    wq = tl.zeros([GP, FP], tl.float32)
    half_q = tl.zeros([GP], tl.float32)
    for gi in tl.static_range(G):
        qg = tl.load(Q + b * sqb + (hk * G + gi) * sqh + dc * sqd, mask=d_ok, other=0.0).to(tl.float32) * root
        wq = tl.where(g[:, None] == gi, tl.sum(proj * qg[None, :], 1)[None, :], wq)
        half_q = tl.where(g == gi, 0.5 * tl.sum(qg * qg, 0), half_q)
    c = tl.max(tl.where(f_ok[None, :], wq, float("-inf")), 1)
    qf = tl.exp(wq - half_q[:, None] - c[:, None]) + 1e-6
    qf = tl.where(f_ok[None, :] & g_ok[:, None], qf, 0.0)
    norm = tl.load(Norm + pid * NF + f, mask=f_ok, other=0.0) + kf
    den = tl.maximum(tl.sum(qf * norm[None, :], 1), 1e-30)
    if chunk == 0:
        tl.store(KfOut + pid * FP + f, kf)

    col = chunk * DC + tl.arange(0, DC)
    is_v = col < D
    val = tl.where(is_v, tl.load(Vn + b * svb + hk * svh + col * svd, mask=is_v, other=0.0).to(tl.float32),
                   tl.load(PosTable + pos * D + col - D, mask=~is_v & (col < 2 * D), other=0.0).to(tl.float32))
    m2 = f_ok[:, None] & (col < 2 * D)[None, :]
    ptr = KV + pid * NF * 2 * D + f[:, None] * (2 * D) + col[None, :]
    kv = tl.load(ptr, mask=m2, other=0.0) + kf[:, None] * val[None, :]
    tl.store(ptr, kv, mask=m2)
    lin = tl.dot(qf, kv, input_precision="ieee") / den[:, None]  # (GP, DC)
    tl.store(Lin + (b * Hkv * G + hk * G + g)[:, None] * (2 * D) + col[None, :], lin,
             mask=g_ok[:, None] & (col < 2 * D)[None, :])


@triton.jit
def _encoder_kernel(
    Lin, Vn, KfIn, Norm, VSum, EncW, EncB, LnW, LnB, DecW, DecB, GateW, GateB, Row, Gates,
    svb, svh, svd,
    Hq, ln_eps,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, NF: tl.constexpr, FP: tl.constexpr,
    HID: tl.constexpr, HP: tl.constexpr, KC: tl.constexpr, OUT: tl.constexpr, OC: tl.constexpr,
    HAS_GATES: tl.constexpr, LOW: tl.constexpr,
):
    """One query head's row: encoder([lin, v]) -> LayerNorm -> GELU -> row decoder, gates (products as
    row-times-matrix reductions: one row per program, the weights read from L2 by every head)."""
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    hk = h // G
    hr = tl.arange(0, HP)
    h_ok = hr < HID
    x = tl.load(EncB + hr, mask=h_ok, other=0.0).to(tl.float32)
    kc = tl.arange(0, KC)
    for start in tl.static_range(0, 3 * D, KC):
        col = start + kc
        is_lin = col < 2 * D
        inp = tl.where(is_lin, tl.load(Lin + pid * (2 * D) + col, mask=is_lin, other=0.0),
                       tl.load(Vn + b * svb + hk * svh + (col - 2 * D) * svd, mask=~is_lin & (col < 3 * D), other=0.0).to(tl.float32))
        if LOW:  # the reference feeds the encoder in the weights' dtype
            inp = inp.to(EncW.dtype.element_ty).to(tl.float32)
        w = tl.load(EncW + hr[:, None] * (3 * D) + col[None, :], mask=h_ok[:, None] & (col < 3 * D)[None, :], other=0.0)
        x += tl.sum(w.to(tl.float32) * inp[None, :], 1)
    mean = tl.sum(x, 0) / HID
    xc = tl.where(h_ok, x - mean, 0.0)
    y = xc / tl.sqrt(tl.sum(xc * xc, 0) / HID + ln_eps)
    y = y * tl.load(LnW + hr, mask=h_ok, other=0.0).to(tl.float32) + tl.load(LnB + hr, mask=h_ok, other=0.0).to(tl.float32)
    hid = tl.where(h_ok, 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476)), 0.0)
    if LOW:
        hid = hid.to(EncW.dtype.element_ty).to(tl.float32)
    oc = tl.arange(0, OC)
    for start in tl.static_range(0, OUT, OC):
        o = start + oc
        o_ok = o < OUT
        wd = tl.load(DecW + o[:, None] * HID + hr[None, :], mask=o_ok[:, None] & h_ok[None, :], other=0.0)
        r = tl.sum(wd.to(tl.float32) * hid[None, :], 1) + tl.load(DecB + o, mask=o_ok, other=0.0).to(tl.float32)
        tl.store(Row + pid * OUT + o, r.to(Row.dtype.element_ty), mask=o_ok)  # the head's C channel rows, contiguous
    if HAS_GATES:
        two = tl.arange(0, 2)
        gw = tl.load(GateW + two[:, None] * HID + hr[None, :], mask=h_ok[None, :], other=0.0)
        s = tl.sum(gw.to(tl.float32) * hid[None, :], 1) + tl.load(GateB + two).to(tl.float32)
        tl.store(Gates + pid * 2 + two, s)
    if h % G == 0:  # the KV head's running sums, once (every estimator program has read the norm)
        kvh = b * (Hq // G) + hk
        f = tl.arange(0, FP)
        f_ok = f < NF
        nptr = Norm + kvh * NF + f
        tl.store(nptr, tl.load(nptr, mask=f_ok, other=0.0) + tl.load(KfIn + kvh * FP + f), mask=f_ok)
        dc = tl.arange(0, BD)
        d_ok = dc < D
        vs = VSum + kvh * D + dc
        v = tl.load(Vn + b * svb + hk * svh + dc * svd, mask=d_ok, other=0.0).to(tl.float32)
        tl.store(vs, tl.load(vs, mask=d_ok, other=0.0) + v, mask=d_ok)


@torch.compiler.disable
def decode_predictor_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, shift: torch.Tensor,
    kv: torch.Tensor, norm: torch.Tensor, v_sum: torch.Tensor, w: RowWeights, scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    nf = w.projection.shape[0]
    hid = w.enc_weight.shape[0]
    out = w.dec_weight.shape[0]  # C * K/4
    for name, t in (("kv", kv), ("norm", norm), ("v_sum", v_sum), ("shift", shift)):
        if not t.is_contiguous() or t.dtype != torch.float32:
            raise ValueError(f"decode_predictor_rows: {name} must be contiguous fp32 (it is updated in place)")
    dev = q.device
    wdtype = w.dec_weight.dtype
    FP, BD = pow2(nf), pow2(d)
    DC = 32 if d >= 32 else 16
    lin = torch.empty(B, Hq, 2 * d, dtype=torch.float32, device=dev)
    kf = torch.empty(B, Hkv, FP, dtype=torch.float32, device=dev)
    _estimator_kernel[(B * Hkv, triton.cdiv(2 * d, DC))](
        q, k, v, pos.contiguous(), shift, kv, norm, w.projection.contiguous(), w.position_values.contiguous(), lin, kf,
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
        Hkv, math.sqrt(scale), G=G, GP=pow2(G), D=d, BD=BD, NF=nf, FP=FP, DC=DC, num_warps=8 if FP * BD >= 16384 else 4,
    )
    row = torch.empty(B, Hq * w.channels, 1, out // w.channels, dtype=wdtype, device=dev)
    gates = torch.empty(B, Hq, 1, 2, dtype=torch.float32, device=dev) if w.gate_weight is not None else None
    weights = [t.contiguous() for t in (w.enc_weight, w.enc_bias, w.ln_weight, w.ln_bias, w.dec_weight, w.dec_bias)]
    gw, gb = (w.gate_weight.contiguous(), w.gate_bias.contiguous()) if gates is not None else (weights[4], weights[5])
    HP = pow2(hid, 1)
    _encoder_kernel[(B * Hq,)](
        lin, v, kf, norm, v_sum, *weights, gw, gb, row, gates if gates is not None else row,
        v.stride(0), v.stride(1), v.stride(3), Hq, w.ln_eps,
        G=G, D=d, BD=BD, NF=nf, FP=FP, HID=hid, HP=HP, KC=max(1, min(128, ENC_TILE // HP)), OUT=out,
        OC=max(1, min(pow2(out, 1), ENC_TILE // HP)), HAS_GATES=gates is not None, LOW=wdtype != torch.float32,
        num_warps=ENC_WARPS,
    )
    return row, gates
