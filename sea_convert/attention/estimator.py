"""The linear-cost estimator: causal random-feature attention with positional values.

Its values are [v, learned position table], so its output says roughly *where* a
query's attention mass lies, at O(T) cost. Features follow Performer's positive
random features for exp(q.k * scale); computed in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.reference_predictor import positive_features


def num_random_features(head_dim: int, nbf: float) -> int:
    """d * ln(d) / nbf, as the reference (nbf=8 -> 33 features at d=64)."""
    return max(1, int(head_dim * math.log(head_dim) / nbf))


def orthogonal_random_projection(num_features: int, dim: int, seed: int) -> torch.Tensor:
    """Gaussian orthogonal random features (Performer): blocks of orthonormal rows, chi-distributed norms.

    The same bits in every process: LAPACK's QR rounds with the thread count (a Ray Train worker has 1 thread,
    `sea-convert run` all the cores; their predictors started 1e-6 apart, seen on an H100 on 2026-12-07), so the
    QR runs on one thread, in float64, rounded to float32 once at the end."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(math.ceil(num_features / dim)):
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g).double())
            blocks.append(q.T)
    finally:
        torch.set_num_threads(threads)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=g).double().norm(dim=1, keepdim=True)
    return (rows * norms).float()


def key_shift(first_key: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """The keys' stabiliser c from a sequence's first key, already scaled: (B, H, 1, d) -> (B, H, 1, 1)."""
    return (first_key @ projection.T).amax(-1, keepdim=True)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class LinearAttentionEstimator(nn.Module):
    def __init__(self, head_dim: int, nbf: float, table_len: int, seed: int):
        super().__init__()
        self.num_features = num_random_features(head_dim, nbf)
        self.register_buffer("projection", orthogonal_random_projection(self.num_features, head_dim, seed))
        self.position_values = nn.Parameter(sinusoid_table(table_len, head_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ops) -> torch.Tensor:
        """q (B, Hq, T, d), k/v (B, Hkv, T, d) -> (B, Hq, T, 2d): linear attention over [v, position]."""
        qf, kf = self.features(q, k, scale)
        return ops.causal_linear_attention(qf, kf, self.values(v))  # GQA: query heads read their KV head's kf, values

    def block_rows(self, q_open: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ops,
                   block_size: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The same linear attention read once per query block, at its first row: q_open (B, Hq, NQB, d), each
        block's opening mean query, attends to the keys up to that row -> (B, Hq, NQB, 2d). The keys' features
        and the values [v, positions] are made inside the op (on the GPU never stored as [v, positions]).
        out_dtype: the consumer's (the encoder's weights); a 16-bit one lets the op compute in bf16."""
        self._check_length(k.shape[2])
        qf = positive_features(q_open.float() * math.sqrt(scale), self.projection.float(), is_query=True)
        return ops.block_rows_estimate(qf, k, v, self.position_values, self.projection, scale, block_size, out_dtype)

    def _check_length(self, T: int) -> None:
        if T > self.position_values.shape[0]:
            raise ValueError(
                f"sequence of {T} tokens exceeds the SEA position table ({self.position_values.shape[0]} rows);"
                " raise sea.position_table_len"
            )

    def values(self, v: torch.Tensor) -> torch.Tensor:
        """[v, positional values] (B, Hkv, T, 2d) fp32, the estimator's values; T checked against the table."""
        B, Hkv, T, d = v.shape
        self._check_length(T)
        return torch.cat([v.float(), self.positions(torch.arange(T, device=v.device)).expand(B, Hkv, T, d)], dim=-1)

    def features(self, q: torch.Tensor, k: torch.Tensor, scale: float, shift: torch.Tensor | None = None):
        root, proj = math.sqrt(scale), self.projection.float()
        return (positive_features(q.float() * root, proj, is_query=True),
                positive_features(k.float() * root, proj, is_query=False, key_shift=shift))

    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        """The learned positional values of positions `rows` ((T,) or (B, T)), fp32, as (.., 1, T, d)."""
        table = self.position_values.float()
        return table[rows][:, None] if rows.dim() == 2 else table[rows][None, None]

    def shift(self, first_key: torch.Tensor, scale: float) -> torch.Tensor:
        return key_shift(first_key.float() * math.sqrt(scale), self.projection.float())
