"""The predictor's row-local math and the causal CNN's last row, as plain functions of its weights.

What the decode step's rows and CNN kernels fuse (their reference, through kernels.reference_decode_step), and
what the model's predictor (sea_convert.attention) computes with over whole sequences: one arithmetic for
both, so token-by-token decoding equals a full re-run. It lives here, not in the model, because kernels may
not import sea_convert.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


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


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int) -> torch.Tensor:
    """A 3x3 convolution that is causal along time (padding on top only), same width. The convolution
    pads both ends itself (no padded copy of the image) and the rows its bottom padding adds are dropped."""
    T = x.shape[-2]
    return F.conv2d(x, weight, bias, padding=(2 * dilation, dilation), dilation=dilation)[..., :T, :]


def cnn_last_row(window: torch.Tensor, absent: torch.Tensor, w: CNNWeights) -> torch.Tensor:
    """The CNN's output (sea_convert.attention.cnn.CausalCNN) for the last row of `window`
    (B, C, CNN_RECEPTIVE_ROWS, W): the rows that feed it. absent (B, rows) marks rows before the
    sequence's start: zero, as the whole-image CNN's padding is, at the input of both convolutions."""
    gone = absent[:, None, :, None]
    x = window.masked_fill(gone, 0.0)
    x = (x + F.relu(causal_conv(x, w.conv1_weight, w.conv1_bias, 1))).masked_fill(gone, 0.0)
    x = x + F.relu(causal_conv(x, w.conv2_weight, w.conv2_bias, 2))
    return cnn_out(x[:, :, -1:], w)


def cnn_out(x: torch.Tensor, w: CNNWeights) -> torch.Tensor:
    """LayerNorm(to_heads(upsample_x4(x))) over K, computed at width K/4: a 1x1 conv commutes with
    nearest upsampling, and a row repeated 4 times has the same mean and variance. 4x less work."""
    y = F.layer_norm(F.conv2d(x, w.head_weight, w.head_bias).contiguous(), (x.shape[-1],), eps=w.ln_eps)
    return torch.addcmul(w.ln_bias, y.repeat_interleave(4, dim=-1), w.ln_weight)
