"""The SEA predictor: estimator -> encoder -> row decoder -> causal CNN -> compressed estimate.

For each query row it predicts log-probabilities over K bins of the row's own prefix,
and the two output gates (s0, s1). Weights are shared across heads, as in the paper;
the CNN's channels mix heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.bins import empty_bins
from kernels.reference_predictor import RowWeights, decode_rows, encode_rows
from sea_convert.attention.cnn import CausalCNN
from sea_convert.attention.estimator import LinearAttentionEstimator
from sea_convert.recipe import SEAConfig


@dataclass
class Estimate:
    """R rows: T (token rows: bins over each query's keys) or NQB (block rows: bins over each query block's
    key blocks, every row of the block reading its block's row, made when the block opens)."""

    log_probs: torch.Tensor  # (B, Hq, R, K); -inf on empty bins of short rows
    gates: torch.Tensor | None  # (B, Hq, R, 2): s0 (probability scale), s1 (running-mean mix)
    image: torch.Tensor | None = None  # the CNN's input (B, Hq*C, R, K/4), when asked for (decoding's prefill)
    block_size: int | None = None  # set for block rows
    # at inference: the probabilities averaged over each KV head's query heads (B, Hkv, R, K), the selection's
    # input, made beside the softmax (one fused pass under torch.compile, not an exp and a mean over (B, Hq, R, K))
    grouped_probs: torch.Tensor | None = None

    def per_query_gates(self, T: int) -> torch.Tensor | None:
        """The gates of each query row (B, Hq, T, 2): block rows' repeated over their block's rows."""
        if self.gates is None or self.block_size is None:
            return self.gates
        return self.gates.repeat_interleave(self.block_size, dim=2)[:, :, :T]


# the output gates' starting (s0, s1): near "plain sparse attention", scale 1 and almost no running-mean mix
GATE_BIAS_INIT = (0.0, -3.0)


class SEAPredictor(nn.Module):
    """Predictor weights of one attention layer (lives inside that layer's attention module)."""

    def __init__(self, cfg: SEAConfig, num_heads: int, num_kv_heads: int, head_dim: int, table_len: int, layer_idx: int):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) is not a multiple of num_kv_heads ({num_kv_heads})")
        self.K = cfg.predictor_length
        self.block_rows = cfg.block_size if cfg.predictor_rows == "block" else None
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.channels = cfg.cnn_channels_per_head
        hidden = cfg.hidden_mult * head_dim
        seed = cfg.seed * 100003 + layer_idx
        self.estimator = LinearAttentionEstimator(head_dim, cfg.nbf, table_len, seed=seed)
        # The starting weights come from the config's seed, not from whatever drew from the global generator before
        # (loading a teacher does, by a varying amount): the same recipe converts to the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = nn.Sequential(nn.Linear(3 * head_dim, hidden), nn.LayerNorm(hidden), nn.GELU())
            self.row_decoder = nn.Linear(hidden, self.channels * self.K // 4)
            self.cnn = CausalCNN(num_heads, self.channels, self.K)
            self.gates = nn.Linear(hidden, 2) if cfg.output_gates else None
        if self.gates is not None:
            nn.init.zeros_(self.gates.weight)
            with torch.no_grad():
                self.gates.bias.copy_(torch.tensor(GATE_BIAS_INIT))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ops, keep_image: bool = False) -> Estimate:
        """Every row reads only rows up to itself (token rows) or its block's first (block rows): the right
        pads of a padded batch, which follow the real rows, never enter a real row's estimate."""
        G = q.shape[1] // k.shape[1]
        if self.block_rows is None:
            lin = self.estimator(q, k, v, scale, ops)  # (B, Hq, T, 2d) fp32
            h, image = self._rows(lin, v, G)
        else:  # one row per query block, made when it opens: the mean query and value of the bs rows up to its first
            bs = self.block_rows
            # (B, Hq, NQB, 2d), in the encoder's dtype: bf16 weights at inference round it to bf16 anyway
            lin = self.estimator.block_rows(ops.opening_means(q, bs), k, v, scale, ops, bs, self.row_decoder.weight.dtype)
            h, image = self._rows(lin, ops.opening_means(v, bs), G)
        logits = self.cnn(image).float()  # (B, Hq, R, K)
        R = logits.shape[2]
        short = min(R, self.K)  # only rows shorter than K (keys, or key blocks) have empty bins
        logits[:, :, :short].masked_fill_(self.empty_bins(torch.arange(short, device=q.device)), float("-inf"))
        est = self._estimate(logits, h)
        if not torch.is_grad_enabled():
            est.grouped_probs = est.log_probs.exp().unflatten(1, (self.num_kv_heads, G)).mean(2)
        est.image = image if keep_image else None
        est.block_size = self.block_rows
        return est

    def _rows(self, lin: torch.Tensor, v: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-local part: encoder state h (B, Hq, T, hidden) and the CNN's input image (B, Hq*C, T, K/4)."""
        w = self.row_weights()
        wdtype = w.dec_weight.dtype
        h = encode_rows(lin.to(wdtype), v.to(wdtype), G, w)
        return h, decode_rows(h, w)

    def row_weights(self) -> RowWeights:
        est, (first, norm, _) = self.estimator, self.encoder
        gates = self.gates
        return RowWeights(est.projection, est.position_values, first.weight, first.bias, norm.weight, norm.bias, norm.eps,
                          self.row_decoder.weight, self.row_decoder.bias,
                          None if gates is None else gates.weight, None if gates is None else gates.bias, self.channels)

    def _estimate(self, logits: torch.Tensor, h: torch.Tensor) -> Estimate:
        gates = self.gates(h).float() if self.gates is not None else None
        return Estimate(torch.log_softmax(logits, dim=-1), gates)

    def empty_bins(self, rows: torch.Tensor) -> torch.Tensor:
        """Bins holding no key for rows at positions `rows` (shape S): (S.., K) bool."""
        return empty_bins(rows, self.K)
