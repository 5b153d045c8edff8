"""The predictor's causal CNN over the compressed map (the row decoder's image of query rows x K/4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.reference_predictor import CNN_RECEPTIVE_ROWS, CNNWeights, causal_conv, cnn_out


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
        self.receptive_rows = CNN_RECEPTIVE_ROWS  # rows t-6..t feed row t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole (B, Hq*C, T, K/4) image -> logits (B, Hq, T, K). The decoder makes only the last row,
        with the same pieces (kernels.reference_predictor.cnn_last_row)."""
        w = self.weights()
        x = x + F.relu(causal_conv(x, w.conv1_weight, w.conv1_bias, 1))
        x = x + F.relu(causal_conv(x, w.conv2_weight, w.conv2_bias, 2))
        return cnn_out(x, w)

    def weights(self) -> CNNWeights:
        return CNNWeights(self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias,
                          self.to_heads.weight, self.to_heads.bias, self.norm.weight, self.norm.bias, self.norm.eps)
