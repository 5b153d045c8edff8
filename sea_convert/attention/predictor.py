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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ops) -> Estimate:
        B, Hq, T, d = q.shape
        G = Hq // k.shape[1]
        wdtype = self.row_decoder.weight.dtype
        lin = self.estimator(q, k, v, scale, ops)  # (B, Hq, T, 2d) fp32
        h = self._encode(lin.to(wdtype), v.to(wdtype), G)  # (B, Hq, T, hidden)
        rows = self.row_decoder(h).view(B, Hq, T, self.channels, self.K // 4)
        image = rows.permute(0, 1, 3, 2, 4).reshape(B, Hq * self.channels, T, self.K // 4)
        logits = self.cnn(image).float()  # (B, Hq, T, K)
        short = min(T, self.K)  # only rows shorter than K have empty bins (that hold no key)
        starts = bin_starts(torch.arange(short, device=q.device), self.K)
        logits[:, :, :short].masked_fill_(starts[:, 1:] == starts[:, :-1], float("-inf"))
        log_probs = torch.log_softmax(logits, dim=-1)
        gates = self.gates(h).float() if self.gates is not None else None
        return Estimate(log_probs, gates)

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
