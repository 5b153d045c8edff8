"""The decode step's CNN row in Triton (decode_cnn_probs): the causal CNN's new row from its ring, the
softmax over bins and the mean over each KV head's group.

Contract: `kernels.reference_decode_step` (same signature, same outputs; the reference is the math
the prefill runs, so decoding on these kernels continues a prefill as a full re-run would).
Decoding one token is launch-bound: each kernel is one program per sequence (or per KV head, query
head, block of channels) that keeps its rows in registers. A step's ops, one module each:
kernels.decode_step_rows, decode_step_cnn, decode_step_select, sparse_decode, decode_step_mix.

conv1 at window rows t-4, t-2, t and then conv2 at row t, each per (sequence, block of 16 output
channels), reading the ring in place and conv1's rows from a scratch buffer; then per (sequence,
KV head) the 1x1 to heads, LayerNorm, softmax over K bins, the group's mean.
Dots on fp32 inputs run in IEEE fp32 (the estimator's sums and fp32 models); on 16-bit weights
the activations are rounded to the weights' dtype before each product, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import kernels._interpreter_compat  # noqa: F401  (CPU interpreter only)
from kernels.reference_predictor import CNNWeights
from kernels.tiles import pow2


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
    CHP, WP, KP = pow2(CH), pow2(W), pow2(K)
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
    GP = pow2(G)
    y_scratch = torch.empty(B * num_kv_heads, GP, WP, dtype=torch.float32, device=dev)
    probs = torch.empty(B, num_kv_heads, K, dtype=torch.float32, device=dev)
    _cnn_head_kernel[(B * num_kv_heads,)](
        image, row, pos, x2, *(t.contiguous() for t in w[4:8]), y_scratch, probs, w.ln_eps,
        CH=CH, CHP=CHP, R=R, W=W, WP=WP, HKV=num_kv_heads, G=G, GP=GP, K=K, KP=KP, LOW=low, num_warps=4,
    )
    return probs
