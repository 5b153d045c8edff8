"""The SEA predictor: estimator -> encoder -> row decoder -> causal CNN -> compressed estimate.

For each query row it predicts log-probabilities over K bins of the row's own prefix,
and the two output gates (s0, s1). Weights are shared across heads, as in the paper;
the CNN's channels mix heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.reference import bin_starts
from sea_convert.attention.estimator import LinearAttentionEstimator
from sea_convert.recipe import SEAConfig


@dataclass
class Estimate:
    log_probs: torch.Tensor  # (B, Hq, T, K); -inf on empty bins of short rows
    gates: torch.Tensor | None  # (B, Hq, T, 2): s0 (probability scale), s1 (running-mean mix)
    image: torch.Tensor | None = None  # the CNN's input (B, Hq*C, T, K/4), when asked for (decoding's prefill)


class CausalCNN(nn.Module):
    """Two 3x3 dilated convolutions over the (query time x compressed width) image.

    Causal along time: a row sees only itself and earlier rows (padding on top only).
    Then x4 upsampling along the width to K, a 1x1 conv to one channel per head, LayerNorm over K.
    """

    def __init__(self, heads: int, channels_per_head: int, K: int):
        super().__init__()
        c = heads * channels_per_head
        self.conv1 = nn.Conv2d(c, c, 3, dilation=1)
        self.conv2 = nn.Conv2d(c, c, 3, dilation=2)
        self.to_heads = nn.Conv2d(c, heads, 1)
        self.norm = nn.LayerNorm(K)
        self.receptive_rows = 1 + 2 * 1 + 2 * 2  # rows t-6..t feed row t

    @staticmethod
    def _causal(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        d = conv.dilation[0]
        return conv(F.pad(x, (d, d, 2 * d, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + F.relu(self._causal(self.conv1, x))
        x = x + F.relu(self._causal(self.conv2, x))
        return self._out(x)

    def last_row(self, window: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
        """forward()'s output for the last row of `window` (B, C, receptive_rows, W): the rows that feed it.
        absent (B, receptive_rows) marks rows before the sequence's start: zero, as forward()'s padding
        is, at the input of both convolutions."""
        gone = absent[:, None, :, None]
        x = window.masked_fill(gone, 0.0)
        x = (x + F.relu(self._causal(self.conv1, x))).masked_fill(gone, 0.0)
        x = x + F.relu(self._causal(self.conv2, x))
        return self._out(x[:, :, -1:])

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        # = norm(to_heads(upsample_x4(x))), computed at width K/4: a 1x1 conv commutes with nearest
        # upsampling, and a row repeated 4 times has the same mean and variance. 4x less work.
        y = F.layer_norm(self.to_heads(x), (x.shape[-1],), eps=self.norm.eps)
        return y.repeat_interleave(4, dim=-1) * self.norm.weight + self.norm.bias


class SEAPredictor(nn.Module):
    """Predictor weights of one attention layer (lives inside that layer's attention module)."""

    def __init__(self, cfg: SEAConfig, num_heads: int, num_kv_heads: int, head_dim: int, table_len: int, layer_idx: int):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) is not a multiple of num_kv_heads ({num_kv_heads})")
        self.K = cfg.predictor_length
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.channels = cfg.cnn_channels_per_head
        hidden = cfg.hidden_mult * head_dim
        self.estimator = LinearAttentionEstimator(head_dim, cfg.nbf, table_len, seed=cfg.seed * 100003 + layer_idx)
        self.encoder = nn.Sequential(nn.Linear(3 * head_dim, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.row_decoder = nn.Linear(hidden, self.channels * self.K // 4)
        self.cnn = CausalCNN(num_heads, self.channels, self.K)
        self.gates = nn.Linear(hidden, 2) if cfg.output_gates else None
        if self.gates is not None:
            # start near "plain sparse attention": scale 1, almost no running-mean mix
            nn.init.zeros_(self.gates.weight)
            nn.init.constant_(self.gates.bias, 0.0)
            with torch.no_grad():
                self.gates.bias[1] = -3.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ops, keep_image: bool = False) -> Estimate:
        lin = self.estimator(q, k, v, scale, ops)  # (B, Hq, T, 2d) fp32
        h, image = self._rows(lin, v, q.shape[1] // k.shape[1])
        logits = self.cnn(image).float()  # (B, Hq, T, K)
        T = q.shape[2]
        short = min(T, self.K)  # only rows shorter than K have empty bins (that hold no key)
        logits[:, :, :short].masked_fill_(self.empty_bins(torch.arange(short, device=q.device)), float("-inf"))
        est = self._estimate(logits, h)
        est.image = image if keep_image else None
        return est

    def _rows(self, lin: torch.Tensor, v: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-local part: encoder state h (B, Hq, T, hidden) and the CNN's input image (B, Hq*C, T, K/4)."""
        B, Hq, T, _ = lin.shape
        wdtype = self.row_decoder.weight.dtype
        h = self._encode(lin.to(wdtype), v.to(wdtype), G)
        rows = self.row_decoder(h).view(B, Hq, T, self.channels, self.K // 4)
        return h, rows.permute(0, 1, 3, 2, 4).reshape(B, Hq * self.channels, T, self.K // 4)

    def _estimate(self, logits: torch.Tensor, h: torch.Tensor) -> Estimate:
        gates = self.gates(h).float() if self.gates is not None else None
        return Estimate(torch.log_softmax(logits, dim=-1), gates)

    def empty_bins(self, rows: torch.Tensor) -> torch.Tensor:
        """Bins holding no key for rows at positions `rows` (shape S): (S.., K) bool."""
        starts = bin_starts(rows, self.K)
        return starts[..., 1:] == starts[..., :-1]

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pos: torch.Tensor, state, ops) -> Estimate:
        """forward()'s rows for one new position per sequence (q (B, Hq, 1, d), k/v (B, Hkv, 1, d) at
        positions pos (B,)), from the running state (estimator sums; the CNN's last rows; updated in place)."""
        lin = self.estimator.step(q, k, v, scale, pos, state, ops)
        h, row = self._rows(lin, v, q.shape[1] // k.shape[1])
        window = torch.cat([state.image, row], dim=2)  # (B, C, receptive_rows, K/4)
        state.image.copy_(window[:, :, 1:])
        R = window.shape[2]
        absent = torch.arange(R, device=q.device)[None, :] < (R - 1 - pos)[:, None]
        logits = self.cnn.last_row(window, absent).float()  # (B, Hq, 1, K)
        logits.masked_fill_(self.empty_bins(pos)[:, None, None, :], float("-inf"))
        return self._estimate(logits, h)

    def _encode(self, lin: torch.Tensor, v: torch.Tensor, G: int) -> torch.Tensor:
        """encoder([lin, v]) without repeating v to the query heads: its part of the first Linear
        is computed once per KV head and broadcast over the group (same weights, same result)."""
        first, norm, act = self.encoder
        d2 = lin.shape[-1]
        x = F.linear(lin, first.weight[:, :d2], first.bias)
        B, Hq, T, hidden = x.shape
        xv = F.linear(v, first.weight[:, d2:])  # (B, Hkv, T, hidden)
        x = (x.view(B, Hq // G, G, T, hidden) + xv.unsqueeze(2)).view(B, Hq, T, hidden)
        return act(norm(x))
