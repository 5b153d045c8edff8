"""The bins of a row's compressed estimate: row t's K bins stretch over its own prefix of n = t + 1
keys, and key s falls in bin floor(s * K / n). Shared by the references, the predictor and the selection."""

from __future__ import annotations

import torch


def key_bins(rows: torch.Tensor, num_keys: int, K: int) -> torch.Tensor:
    """Bin index of every key s < num_keys for each query row in `rows` (clamped to K-1 past the row)."""
    s = torch.arange(num_keys, device=rows.device)
    n = (rows + 1).unsqueeze(-1)
    return torch.clamp((s * K) // n, max=K - 1)


def bin_starts(rows: torch.Tensor, K: int) -> torch.Tensor:
    """First key of each bin m = 0..K (K+1 edges) per row: ceil(m * n / K). Bin m is empty iff start[m] == start[m+1]."""
    m = torch.arange(K + 1, device=rows.device)
    n = (rows + 1).unsqueeze(-1)
    return (m * n + K - 1) // K


def empty_bins(rows: torch.Tensor, K: int) -> torch.Tensor:
    """Bins holding no key for rows at positions `rows` (any shape S): (S.., K) bool."""
    starts = bin_starts(rows, K)
    return starts[..., 1:] == starts[..., :-1]
