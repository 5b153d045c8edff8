"""The decode step's predictor and selection in Triton: a few kernels instead of ~100 small ops.

Contract: `kernels.reference_decode_step` (same signatures, same outputs; the reference is the math
the prefill runs, so decoding on these kernels continues a prefill as a full re-run would).

Decoding one token is launch-bound: the work per layer is a few small matrix products and
O(K + key blocks) elementwise work. Each kernel is one program per sequence (or per KV head)
that keeps its rows in registers:
- rows: the estimator per (sequence, KV head, column chunk of [v, position]): the key's random
  features update the running sums (F x 2d, fp32, each chunk read and written once) and the G
  query heads read them; then the encoder, row decoder and gates per (sequence, query head).
  (One program per KV head doing all of it took 420 us on an H100: too few programs, too large
  tiles.)
- cnn: conv1 at window rows t-4, t-2, t and then conv2 at row t, each per (sequence, block of 16
  output channels), reading the ring in place and conv1's rows from a scratch buffer; then per
  (sequence, KV head) the 1x1 to heads, LayerNorm, softmax over K bins, the group's mean.
- select: two kernels of one program per (sequence, KV head). The first spreads the query block's
  pooled estimate over the key blocks (NKB of them: the whole position table, fixed shapes) as
  order-preserving int32 keys, finds the head's budget-th largest key t_h and keeps the keys above
  it as candidates (ties counted). The grouped threshold is at least every t_h, so the second
  finds it from all heads' candidates alone, then writes its head's sorted list with a prefix sum.
  Both searches are ternary with the two counts packed in one reduction (21 block-wide sums, not
  32 bisection passes). Measured on an H100 at 8 x 2049 blocks (128k context): 21.7 us for both
  kernels; one program per sequence took 68 us, a radix select by four 256-bin tl.histogram passes
  228 us. Exact ties at the threshold go to the lowest (KV head, block) (torch.topk's order among
  equal values is unspecified).
- mix: the output gates, one program per (sequence, KV head) (per-query mode; block mode applies
  them where kernels.sparse_decode combines its splits).
Dots on fp32 inputs run in IEEE fp32 (the estimator's sums and fp32 models); on 16-bit weights
the activations are rounded to the weights' dtype before each product, as the reference does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels.block_budget import BlockBudget
from kernels.reference_predictor import CNNWeights, RowWeights
from kernels.sparse_decode import gate_weights

MIN_ROWS = 16  # tl.dot needs at least 16 rows (and columns)
# weight elements per round of the encoder's row-times-matrix products (64 fp32 registers a thread at
# ENC_WARPS): fewer, larger rounds of loads. H100, hidden 256: 8192 at 8 warps (12 + 4 rounds) 10.2 us,
# 16384 at 8 warps (6 + 2 rounds) 7.8 us, 32768 at 16 warps (3 + 1 rounds) 7.6 us
ENC_TILE, ENC_WARPS = 32768, 16
PACK16_MAX = 16384  # counts up to this fit two to an int32 (low field < 2^16, high field < 2^31)
INT32_MIN = tl.constexpr(-2147483648)
INT32_MAX = tl.constexpr(2147483647)


def _p2(n: int, least: int = MIN_ROWS) -> int:
    return max(least, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------
# 1. rows: the estimator's step (per KV head and column chunk), then encoder -> row decoder, gates
#    (per query head)


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
    FP, BD = _p2(nf), _p2(d)
    DC = 32 if d >= 32 else 16
    lin = torch.empty(B, Hq, 2 * d, dtype=torch.float32, device=dev)
    kf = torch.empty(B, Hkv, FP, dtype=torch.float32, device=dev)
    _estimator_kernel[(B * Hkv, triton.cdiv(2 * d, DC))](
        q, k, v, pos.contiguous(), shift, kv, norm, w.projection.contiguous(), w.position_values.contiguous(), lin, kf,
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
        Hkv, math.sqrt(scale), G=G, GP=_p2(G), D=d, BD=BD, NF=nf, FP=FP, DC=DC, num_warps=8 if FP * BD >= 16384 else 4,
    )
    row = torch.empty(B, Hq * w.channels, 1, out // w.channels, dtype=wdtype, device=dev)
    gates = torch.empty(B, Hq, 1, 2, dtype=torch.float32, device=dev) if w.gate_weight is not None else None
    weights = [t.contiguous() for t in (w.enc_weight, w.enc_bias, w.ln_weight, w.ln_bias, w.dec_weight, w.dec_bias)]
    gw, gb = (w.gate_weight.contiguous(), w.gate_bias.contiguous()) if gates is not None else (weights[4], weights[5])
    HP = _p2(hid, 1)
    _encoder_kernel[(B * Hq,)](
        lin, v, kf, norm, v_sum, *weights, gw, gb, row, gates if gates is not None else row,
        v.stride(0), v.stride(1), v.stride(3), Hq, w.ln_eps,
        G=G, D=d, BD=BD, NF=nf, FP=FP, HID=hid, HP=HP, KC=max(1, min(128, ENC_TILE // HP)), OUT=out,
        OC=max(1, min(_p2(out, 1), ENC_TILE // HP)), HAS_GATES=gates is not None, LOW=wdtype != torch.float32,
        num_warps=ENC_WARPS,
    )
    return row, gates


# ---------------------------------------------------------------------------
# 2. cnn: the CNN's new row from its ring (conv1 and conv2 split over output channels), then softmax
#    over bins and the mean over each KV head's group


@triton.jit
def _conv_rows_input(Image, Row, X1, b, pos, row, ch, shift, ok, col,
                     CH: tl.constexpr, R: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, FROM_X1: tl.constexpr):
    """Window row `row` (0..R; R is the new one) of channels ch, each shifted by its own `shift` along
    the width, zero outside it (and where not ok): the CNN's input from the ring, or conv1's output
    (rows 2, 4, 6 in X1's slots 0, 1, 2)."""
    c = col[None, :] + shift[:, None]
    m = ok[:, None] & (c >= 0) & (c < W)
    if FROM_X1:
        return tl.load(X1 + (b * 3 + row // 2 - 1) * CH * WP + ch[:, None] * WP + c, mask=m, other=0.0)
    slot = (pos + row) % R
    ring = tl.load(Image + ((b * CH + ch[:, None]) * R + slot) * W + c, mask=m & (row < R), other=0.0)
    new = tl.load(Row + b * CH * W + ch[:, None] * W + c, mask=m & (row == R), other=0.0)
    return tl.where(row == R, new.to(tl.float32), ring.to(tl.float32))


@triton.jit
def _conv_kernel(
    Image, Row, Pos, Wt, Bias, X1, X2,
    CH: tl.constexpr, CHP: tl.constexpr, OCB: tl.constexpr, R: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
    SECOND: tl.constexpr, LOW: tl.constexpr,
):
    """OCB output channels of one output row. conv1 (dilation 1) at window rows 2, 4, 6 (t-4, t-2, t:
    what conv2's last row reads) -> X1, zero on rows before the sequence's start; conv2 (dilation 2)
    at row t over them -> X2. Each adds its input (the residual) after the ReLU.
    One product per kernel row ky: the three taps kx of every input channel stacked along the
    reduction (channel-major, a fourth zero tap to keep it a power of two), so a program makes three
    rounds of loads instead of nine (nine took 10 us per conv on an H100)."""
    b = tl.program_id(0)
    job = tl.program_id(1)
    nblk: tl.constexpr = (CH + OCB - 1) // OCB
    r = job // nblk  # conv1: output row 2r + 2
    oc = (job % nblk) * OCB + tl.arange(0, OCB)
    oc_ok = oc < CH
    pos = tl.load(Pos + b)
    t = tl.arange(0, 4 * CHP)
    ci = t // 4
    kx = t % 4
    t_ok = (ci < CH) & (kx < 3)
    col = tl.arange(0, WP)
    col_ok = col < W
    acc = tl.zeros([OCB, WP], tl.float32)
    for ky in tl.static_range(3):
        wt = tl.load(Wt + oc[:, None] * (CH * 9) + ci[None, :] * 9 + ky * 3 + kx[None, :],
                     mask=oc_ok[:, None] & t_ok[None, :], other=0.0)
        if SECOND:
            xin = _conv_rows_input(Image, Row, X1, b, pos, 2 * ky + 2, ci, 2 * (kx - 1), t_ok, col, CH, R, W, WP, True)
        else:
            xin = _conv_rows_input(Image, Row, X1, b, pos, 2 * r + ky, ci, kx - 1, t_ok, col, CH, R, W, WP, False)
            xin = tl.where(2 * r + ky >= R - pos, xin, 0.0)  # rows before the sequence's start are zero
        if LOW:
            acc += tl.dot(wt, xin.to(wt.dtype))
        else:
            acc += tl.dot(wt.to(tl.float32), xin, input_precision="ieee")
    out_ch = oc[:, None]
    m = oc_ok[:, None] & col_ok[None, :]
    bias = tl.load(Bias + oc, mask=oc_ok, other=0.0).to(tl.float32)[:, None]
    if SECOND:
        res = tl.load(X1 + (b * 3 + 2) * CH * WP + out_ch * WP + col[None, :], mask=m, other=0.0)
        tl.store(X2 + b * CH * WP + out_ch * WP + col[None, :], res + tl.maximum(acc + bias, 0.0), mask=m)
    else:
        row = 2 * r + 2
        res = _conv_rows_input(Image, Row, X1, b, pos, row, oc, tl.zeros([OCB], tl.int32), oc_ok, col, CH, R, W, WP,
                               False)
        x1 = tl.where(row >= R - pos, res + tl.maximum(acc + bias, 0.0), 0.0)
        if LOW:  # the reference keeps conv1's output in the weights' dtype
            x1 = x1.to(Wt.dtype.element_ty).to(tl.float32)
        tl.store(X1 + (b * 3 + r) * CH * WP + out_ch * WP + col[None, :], x1, mask=m)


@triton.jit
def _cnn_head_kernel(
    Image, Row, Pos, X2, HW, HB, LnW, LnB, YScratch, Probs,
    ln_eps,
    CH: tl.constexpr, CHP: tl.constexpr, R: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, LOW: tl.constexpr,
):
    """One KV head's G query heads: to heads (1x1), LayerNorm over K/4 (= over K after the x4
    upsampling), softmax over the K bins (empty bins of a short row 0), their mean. The first KV
    head's program also puts the new row into the ring."""
    pid = tl.program_id(0)
    b = pid // HKV
    hk = pid % HKV
    pos = tl.load(Pos + b)
    ch = tl.arange(0, CHP)
    ch_ok = ch < CH
    col = tl.arange(0, WP)
    col_ok = col < W
    x2 = tl.load(X2 + b * CH * WP + ch[:, None] * WP + col[None, :], mask=ch_ok[:, None] & col_ok[None, :], other=0.0)
    g = tl.arange(0, GP)
    g_ok = g < G
    hq = hk * G + g
    hw = tl.load(HW + hq[:, None] * CH + ch[None, :], mask=g_ok[:, None] & ch_ok[None, :], other=0.0)
    if LOW:
        o = tl.dot(hw, x2.to(hw.dtype))
    else:
        o = tl.dot(hw.to(tl.float32), x2, input_precision="ieee")
    o += tl.load(HB + hq, mask=g_ok, other=0.0).to(tl.float32)[:, None]
    mean = tl.sum(tl.where(col_ok[None, :], o, 0.0), 1) / W
    oc = tl.where(col_ok[None, :], o - mean[:, None], 0.0)
    y = oc / tl.sqrt(tl.sum(oc * oc, 1) / W + ln_eps)[:, None]
    tl.store(YScratch + (pid * GP + g[:, None]) * WP + col[None, :], y)
    tl.debug_barrier()  # the upsampled read below gathers other threads' entries

    # logits over the K bins: bin j reads column j // 4; empty bins of a short row are -inf
    kk = tl.arange(0, KP)
    k_ok = kk < K
    yk = tl.load(YScratch + (pid * GP + g[:, None]) * WP + (kk // 4)[None, :], mask=k_ok[None, :], other=0.0)
    logit = yk * tl.load(LnW + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :] \
        + tl.load(LnB + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    n = pos + 1
    empty = (kk * n + K - 1) // K == ((kk + 1) * n + K - 1) // K
    logit = tl.where((k_ok & ~empty)[None, :], logit, float("-inf"))
    m = tl.max(logit, 1)
    p = tl.exp(logit - m[:, None])
    p = tl.where(g_ok[:, None], p / tl.sum(p, 1)[:, None], 0.0)
    tl.store(Probs + pid * K + kk, tl.sum(p, 0) / G, mask=k_ok)

    if hk == 0:  # the new row takes the ring slot of row t-R (conv1, an earlier kernel, has read the ring)
        new = tl.load(Row + b * CH * W + ch[:, None] * W + col[None, :], mask=ch_ok[:, None] & col_ok[None, :])
        tl.store(Image + ((b * CH + ch[:, None]) * R + pos % R) * W + col[None, :], new, mask=ch_ok[:, None] & col_ok[None, :])


@torch.compiler.disable
def decode_cnn_probs(image: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, w: CNNWeights, num_kv_heads: int) -> torch.Tensor:
    B, CH, R, W = image.shape
    Hq = w.head_weight.shape[0]
    K = w.ln_weight.shape[0]
    if not image.is_contiguous():
        raise ValueError("decode_cnn_probs: image must be contiguous (it is updated in place)")
    if R + 1 != 7:
        raise ValueError(f"decode_cnn_probs: the ring holds 6 rows (the CNN's receptive field less one), got {R}")
    CHP, WP, KP = _p2(CH), _p2(W), _p2(K)
    dev = image.device
    x1 = torch.empty(B, 3, CH, WP, dtype=torch.float32, device=dev)
    x2 = torch.empty(B, CH, WP, dtype=torch.float32, device=dev)
    row, pos = row.contiguous(), pos.contiguous()
    low = w.conv1_weight.dtype != torch.float32
    OCB = 16
    nblk = triton.cdiv(CH, OCB)
    for second, (wt, bias) in enumerate(((w.conv1_weight, w.conv1_bias), (w.conv2_weight, w.conv2_bias))):
        _conv_kernel[(B, (1 if second else 3) * nblk)](
            image, row, pos, wt.contiguous(), bias.contiguous(), x1, x2,
            CH=CH, CHP=CHP, OCB=OCB, R=R, W=W, WP=WP, SECOND=bool(second), LOW=low, num_warps=8,
        )
    G = Hq // num_kv_heads
    GP = _p2(G)
    y_scratch = torch.empty(B * num_kv_heads, GP, WP, dtype=torch.float32, device=dev)
    probs = torch.empty(B, num_kv_heads, K, dtype=torch.float32, device=dev)
    _cnn_head_kernel[(B * num_kv_heads,)](
        image, row, pos, x2, *(t.contiguous() for t in w[4:8]), y_scratch, probs, w.ln_eps,
        CH=CH, CHP=CHP, R=R, W=W, WP=WP, HKV=num_kv_heads, G=G, GP=GP, K=K, KP=KP, LOW=low, num_warps=4,
    )
    return probs


# ---------------------------------------------------------------------------
# 3. select: pooled estimate -> key block scores -> grouped top-k -> sorted lists


@triton.jit
def _thirds(lo, hi):
    """Two cut points splitting [lo, hi) into thirds (int64), and them as int32 compare values."""
    third = (hi - lo + 2) // 3
    m1 = lo + third
    m2 = lo + 2 * third
    return m1, m2, tl.minimum(m1, INT32_MAX).to(tl.int32), tl.minimum(m2, INT32_MAX).to(tl.int32)


@triton.jit
def _narrow(lo, hi, m1, m2, n1, n2, budget):
    """One ternary step of the threshold search: keep the third holding the largest t with
    #(key >= t) >= budget (counts n1, n2 at the cuts; cuts at or past hi count as too few)."""
    e1 = (m1 < hi) & (n1 >= budget)
    e2 = (m2 < hi) & (n2 >= budget)
    new_lo = tl.where(e2, m2, tl.where(e1, m1, lo))
    new_hi = tl.where(e2, hi, tl.where(e1, tl.minimum(m2, hi), tl.minimum(m1, hi)))
    return new_lo, new_hi


@triton.jit
def _count_at_cuts(key, c1, c2, WIDE: tl.constexpr):
    """#(key >= c1) and #(key >= c2) over all of key, in one reduction: both counts packed in one
    integer (16-bit fields, 32-bit ones when WIDE), so each search step pays a single block-wide sum."""
    if WIDE:
        packed = tl.sum(tl.reshape((key >= c1).to(tl.int64) + ((key >= c2).to(tl.int64) << 32), [key.numel]), 0)
        return packed & 0xFFFFFFFF, packed >> 32
    else:
        packed = tl.sum(tl.reshape((key >= c1).to(tl.int32) + ((key >= c2).to(tl.int32) << 16), [key.numel]), 0)
        return packed & 0xFFFF, packed >> 16


SEARCH_STEPS = tl.constexpr(21)  # ternary steps from 2^32 - 1 candidates to one: 3^21 > 2^32


@triton.jit
def _select_candidates_kernel(
    Probs, BlockSum, Length, CdfScratch, Keys, Cand, Thr, Ties, Step,
    density,
    HKV: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NKB: tl.constexpr, NKBP: tl.constexpr,
    MAXB: tl.constexpr, MAXBP: tl.constexpr, BS: tl.constexpr, PER_HEAD: tl.constexpr, HAS_DENSITY: tl.constexpr,
    SINK: tl.constexpr, LOCAL: tl.constexpr, WIDE: tl.constexpr,
):
    """One KV head: its key block scores as order-preserving int32 keys (-> Keys), the budget-th
    largest of them t_h (ternary search), and its candidates: the keys above t_h (fewer than the budget,
    -> Cand) and how many equal t_h (-> Thr, Ties). The grouped threshold is at least every t_h, so
    the candidates hold every key the group can keep."""
    pid = tl.program_id(0)
    b = pid // HKV
    pos = tl.load(Length + b)
    n = pos + 1
    qb = pos // BS
    within = pos % BS
    kk = tl.arange(0, KP)
    k_ok = kk < K
    # the current query block's rows so far (reset when this row opens the block), their mean
    ptr = pid * K + kk
    block = tl.load(BlockSum + ptr, mask=k_ok, other=0.0)
    block = tl.where(within == 0, 0.0, block) + tl.load(Probs + ptr, mask=k_ok, other=0.0)
    tl.store(BlockSum + ptr, block, mask=k_ok)
    pooled = block / (within + 1).to(tl.float32)
    # mass before each bin edge: cdf[0] = 0, cdf[m] = pooled[0] + .. + pooled[m-1]; scratch for the gathers
    base = CdfScratch + pid * (2 * KP + 2)
    tl.store(base + 1 + kk, tl.cumsum(pooled, 0), mask=k_ok)
    tl.store(base + kk, tl.zeros([KP], tl.float32), mask=kk == 0)
    tl.store(base + KP + 1 + kk, pooled, mask=k_ok)
    tl.debug_barrier()

    # each key block's share: bins spread evenly over their keys (spread_bins_to_key_blocks)
    j = tl.arange(0, NKBP)
    nf = n.to(tl.float32)
    u0 = tl.minimum((j * BS).to(tl.float32) * K / nf, K * 1.0)
    u1 = tl.minimum(((j + 1) * BS).to(tl.float32) * K / nf, K * 1.0)
    lo0 = tl.minimum(tl.floor(u0).to(tl.int32), K - 1)
    lo1 = tl.minimum(tl.floor(u1).to(tl.int32), K - 1)
    f0 = tl.load(base + lo0) + (u0 - lo0) * tl.load(base + KP + 1 + lo0)
    f1 = tl.load(base + lo1) + (u1 - lo1) * tl.load(base + KP + 1 + lo1)
    score = f1 - f0

    # order-preserving int32 keys: forced (sink, local) blocks on top, future / padding at the bottom
    causal = (j <= qb) & (j < NKB)
    forced = causal & ((j < SINK) | (j > qb - LOCAL))
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(forced, INT32_MAX, key)
    key = tl.where(causal, key, INT32_MIN)
    tl.store(Keys + pid * NKBP + j, key)
    # BlockBudget.blocks (kernels/block_budget.py) is the rule, here in tl ops: qb is known only on the device
    if HAS_DENSITY:
        base = tl.ceil(density * (qb + 1).to(tl.float32)).to(tl.int32)
    else:
        base = PER_HEAD
    budget = tl.minimum(qb + 1, tl.maximum(base, SINK + LOCAL)) * HKV

    # the budget-th largest key of this head: the largest t with #(key >= t) >= budget
    lo = tl.full([], INT32_MIN + 1, tl.int64)
    hi = tl.full([], INT32_MAX, tl.int64) + 1
    for _ in range(SEARCH_STEPS):
        m1, m2, c1, c2 = _thirds(lo, hi)
        n1, n2 = _count_at_cuts(key, c1, c2, WIDE)
        lo, hi = _narrow(lo, hi, m1, m2, n1, n2, budget)
    t_h = lo.to(tl.int32)
    above = key > t_h  # fewer than the budget (<= MAXB, the host's bound on it)
    place = tl.cumsum(above.to(tl.int32), 0) - 1
    tl.store(Cand + pid * MAXB + place, key, mask=above & (place < MAXB))
    s = tl.arange(0, MAXBP)
    tl.store(Cand + pid * MAXB + s, tl.full([MAXBP], INT32_MIN, tl.int32),
             mask=(s >= tl.sum(above.to(tl.int32), 0)) & (s < MAXB))
    tl.store(Thr + pid, t_h)
    tl.store(Ties + pid, tl.sum((key == t_h).to(tl.int32), 0))
    if pid % HKV == 0:  # the row's position and budget for the second kernel (which moves Length on)
        tl.store(Step + b * 2, pos)
        tl.store(Step + b * 2 + 1, budget)


@triton.jit
def _select_lists_kernel(
    Keys, Cand, Thr, Ties, Step, Length, Index, Count, Kept,
    HKV: tl.constexpr, HKVP: tl.constexpr, NKBP: tl.constexpr, MAXB: tl.constexpr, MAXBP: tl.constexpr,
    BS: tl.constexpr, WIDE: tl.constexpr,
):
    """One KV head's sorted list. Every program of a sequence finds the same grouped threshold T
    (the budget-th largest key over all heads) from the heads' candidates, searching above the
    largest t_h; exact ties at T go to the lowest (KV head, block)."""
    pid = tl.program_id(0)
    b = pid // HKV
    hk = pid % HKV
    pos = tl.load(Step + b * 2)
    budget = tl.load(Step + b * 2 + 1)
    hh = tl.arange(0, HKVP)
    h_ok = hh < HKV
    s = tl.arange(0, MAXBP)
    cand = tl.load(Cand + (b * HKV + hh[:, None]) * MAXB + s[None, :], mask=h_ok[:, None] & (s < MAXB)[None, :],
                   other=INT32_MIN)
    thr = tl.load(Thr + b * HKV + hh, mask=h_ok, other=INT32_MIN)
    ties = tl.load(Ties + b * HKV + hh, mask=h_ok, other=0)
    # #(key >= t) over all heads, for t >= max t_h: the candidates >= t, plus head h's ties when t == t_h
    ties_capped = tl.minimum(ties, budget)  # same verdict (>= budget), bounded counts for the packing
    lo = tl.max(thr, 0).to(tl.int64)
    hi = tl.full([], INT32_MAX, tl.int64) + 1
    for _ in range(SEARCH_STEPS):
        m1, m2, c1, c2 = _thirds(lo, hi)
        n1, n2 = _count_at_cuts(cand, c1, c2, WIDE)
        n1 += tl.sum(tl.where(thr >= c1, ties_capped, 0), 0)
        n2 += tl.sum(tl.where(thr >= c2, ties_capped, 0), 0)
        lo, hi = _narrow(lo, hi, m1, m2, n1, n2, budget)
    threshold = lo.to(tl.int32)
    need = budget - tl.sum(tl.sum((cand > threshold).to(tl.int32), 1), 0)
    tie_heads = tl.sum((cand == threshold).to(tl.int32), 1) + tl.where(thr == threshold, ties, 0)
    ties_before = tl.sum(tl.where(hh < hk, tie_heads, 0), 0)

    j = tl.arange(0, NKBP)
    key = tl.load(Keys + pid * NKBP + j)
    tie = (key == threshold).to(tl.int32)
    tie_rank = tl.cumsum(tie, 0) - tie + ties_before
    take = (key > threshold) | ((tie > 0) & (tie_rank < need))
    # the sorted list: a chosen block's place is the count of chosen blocks before it
    take_i = take.to(tl.int32)
    place = tl.cumsum(take_i, 0) - 1
    count = tl.sum(take_i, 0)
    out = Index + pid * MAXB
    tl.store(out + place, j, mask=take)
    m = tl.arange(0, MAXBP)
    tl.store(out + m, tl.full([MAXBP], -1, tl.int32), mask=(m >= count) & (m < MAXB))
    tl.store(Count + pid, count)
    qb = pos // BS
    full = tl.sum((take & (j < qb)).to(tl.int64), 0)
    diag = tl.sum((take & (j == qb)).to(tl.int64), 0)
    tl.store(Kept + pid, full * BS + diag * (pos % BS + 1))
    if hk == 0:
        tl.store(Length + b, pos + 1)


@torch.compiler.disable
def decode_select_blocks(
    probs: torch.Tensor, block_sum: torch.Tensor, length: torch.Tensor, block_size: int, num_key_blocks: int,
    budget: BlockBudget, max_budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hkv, K = probs.shape
    if not (block_sum.is_contiguous() and length.is_contiguous()):
        raise ValueError("decode_select_blocks: block_sum and length must be contiguous (they are updated in place)")
    maxb = min(num_key_blocks, max_budget)
    HKVP, KP = triton.next_power_of_2(Hkv), triton.next_power_of_2(K)
    nkbp, maxbp = triton.next_power_of_2(num_key_blocks), triton.next_power_of_2(maxb)
    dev = probs.device
    index = torch.empty(B, Hkv, maxb, dtype=torch.int32, device=dev)
    count = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    kept = torch.empty(B, Hkv, dtype=torch.int64, device=dev)
    cdf = torch.empty(B * Hkv, 2 * KP + 2, dtype=torch.float32, device=dev)
    keys = torch.empty(B * Hkv, nkbp, dtype=torch.int32, device=dev)
    cand = torch.empty(B * Hkv, maxb, dtype=torch.int32, device=dev)
    thr = torch.empty(B * Hkv, dtype=torch.int32, device=dev)
    ties = torch.empty(B * Hkv, dtype=torch.int32, device=dev)
    step = torch.empty(B, 2, dtype=torch.int32, device=dev)
    _select_candidates_kernel[(B * Hkv,)](
        probs.contiguous(), block_sum, length, cdf, keys, cand, thr, ties, step,
        0.0 if budget.density is None else budget.density,
        HKV=Hkv, K=K, KP=KP, NKB=num_key_blocks, NKBP=nkbp, MAXB=maxb, MAXBP=maxbp, BS=block_size,
        PER_HEAD=budget.per_head or 0, HAS_DENSITY=budget.density is not None, SINK=budget.sink_blocks,
        LOCAL=budget.local_blocks,
        WIDE=nkbp > PACK16_MAX, num_warps=min(8, max(4, nkbp // 512)),
    )
    _select_lists_kernel[(B * Hkv,)](
        keys, cand, thr, ties, step, length, index, count, kept,
        HKV=Hkv, HKVP=HKVP, NKBP=nkbp, MAXB=maxb, MAXBP=maxbp, BS=block_size,
        WIDE=Hkv * (maxb + max_budget) > PACK16_MAX, num_warps=min(8, max(4, max(nkbp, HKVP * maxbp) // 512)),
    )
    return index, count, kept


# ---------------------------------------------------------------------------
# 4. mix: the output gates


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
