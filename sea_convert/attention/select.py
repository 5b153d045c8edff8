"""From the compressed estimate to the keys each query attends to.

Two modes: `per_query` (the paper: grouped top-k over each row's bins, bins
interpolated to key spans) and `block` (GPU-shaped: the estimate pooled over a
query block, top key blocks, sink and local blocks always kept). In both, the
query heads of one KV head share the selection (GQA), and the KV heads of a query
share one budget (the paper's grouped top-k).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kernels.block_budget import BlockBudget
from kernels.bins import bin_starts
from kernels.reference_gates import kept_from_blocks
from kernels.reference_select import select_key_blocks
from kernels.reference_teacher_target import block_attention_mass
from sea_convert.recipe import SEAConfig


@dataclass
class Selection:
    mode: str
    seq_len: int  # T
    block_index: torch.Tensor | None = None  # (B, Hkv, NQB, MAXB) int32, sorted, -1 padded
    block_count: torch.Tensor | None = None  # (B, Hkv, NQB) int32
    bin_mask: torch.Tensor | None = None  # (B, Hkv, T, K) bool
    block_size: int = 0

    @functools.cached_property
    def kept(self) -> torch.Tensor:
        """(B, Hkv, T) keys each row attends to; made when asked (the gated kernel counts them itself)."""
        if self.mode == "block":
            return kept_from_blocks(self.block_index, self.block_count, self.block_size, self.seq_len)
        return kept_from_bins(self.bin_mask)

    def attend(self, q, k, v, scale: float, ops) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "block":
            return ops.block_sparse_attention(q, k, v, self.block_index, self.block_count, self.block_size, scale)
        return ops.per_query_sparse_attention(q, k, v, self.bin_mask, scale)

    def causal_entries(self) -> float:
        B, Hkv = (self.block_index if self.mode == "block" else self.bin_mask).shape[:2]
        return self.seq_len * (self.seq_len + 1) / 2 * B * Hkv

    def density(self) -> tuple[float, float]:
        """(kept entries, causal entries) summed over batch and KV heads."""
        return float(self.kept.sum()), self.causal_entries()

    def kept_fraction(self) -> torch.Tensor:
        """kept / causal as a device tensor (no host sync)."""
        return self.kept.sum() / self.causal_entries()


def kept_from_bins(bin_mask: torch.Tensor) -> torch.Tensor:
    T, K = bin_mask.shape[-2:]
    starts = bin_starts(torch.arange(T, device=bin_mask.device), K)
    widths = starts[:, 1:] - starts[:, :-1]
    return (bin_mask * widths).sum(-1)


def block_budget(cfg: SEAConfig) -> BlockBudget:
    """Block mode's budget from the SEA settings: block_density, else block_keys (default k) keys per
    head per query in whole blocks, rounded up; sink and local blocks always kept."""
    forced = dict(sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks)
    if cfg.block_density is not None:
        return BlockBudget(density=cfg.block_density, **forced)
    return BlockBudget.from_keys(cfg.block_keys if cfg.block_keys is not None else cfg.k, cfg.block_size, **forced)


def kept_from_bins_row(bin_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """kept_from_bins for one row per sequence at position pos (B,): bin_mask (B, Hkv, K) -> (B, Hkv)."""
    starts = bin_starts(pos, bin_mask.shape[-1])  # (B, K+1)
    return (bin_mask * (starts[:, 1:] - starts[:, :-1])[:, None, :]).sum(-1)


def select(est_probs: torch.Tensor, cfg: SEAConfig, num_kv_heads: int, ops, valid: torch.Tensor | None = None,
           seq_len: int | None = None) -> Selection:
    """est_probs: (B, Hq, R, K) estimate probabilities (no grad needed), or their mean over each KV head's query
    heads (B, Hkv, R, K) (`Estimate.grouped_probs`; with Hq = Hkv the two are the same): R = T token rows, or the
    NQB block rows of `sea.predictor_rows: block` (then seq_len gives T).

    valid: (B, T) bool of a right-padded batch (each row's real tokens first). Per-query selection
    reads each row alone, so pads change nothing there; block mode pools rows of a query block, and
    with `valid` the pads are left out of that pooling (`pool_key_block_scores`' lengths): real rows select as in
    their unpadded sequence.
    """
    T = est_probs.shape[2] if seq_len is None else seq_len
    if cfg.mode == "block":
        scores = block_selection_scores(est_probs, cfg, num_kv_heads, ops, valid)
        budget = block_budget(cfg)
        index, count = ops.select_key_blocks(scores, budget, max_budget=budget.bound(scores.shape[-1]) * num_kv_heads)
        return Selection("block", T, block_index=index, block_count=count, block_size=cfg.block_size)
    return Selection("per_query", T, bin_mask=ops.select_bins_per_query(_grouped(est_probs, num_kv_heads), cfg.k))


def _grouped(est_probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, Hq, R, K) -> the mean over each KV head's query heads, (B, Hkv, R, K)."""
    B, Hq, R, K = est_probs.shape
    return est_probs if Hq == num_kv_heads else est_probs.view(B, num_kv_heads, Hq // num_kv_heads, R, K).mean(2)


def block_selection_scores(est_probs: torch.Tensor, cfg: SEAConfig, num_kv_heads: int, ops,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, Hkv, NQB, NKB) scores block mode ranks (`select`'s arguments): one per (query block, key block)."""
    grouped = _grouped(est_probs, num_kv_heads)
    if cfg.predictor_rows == "block":  # already one row per query block, over key blocks
        return ops.block_scores_from_bins(grouped, grouped.shape[2])
    return ops.pool_key_block_scores(grouped, cfg.block_size, None if valid is None else valid.sum(-1))


def oracle_select(q: torch.Tensor, k: torch.Tensor, scale: float, cfg: SEAConfig, valid: torch.Tensor | None = None) -> Selection:
    """The best any mask estimator can do at this budget: the truly most-attended key blocks
    (same budget rule, sink and local blocks kept). For quality ceilings, not for speed.

    valid: (B, T) bool of a right-padded batch. Pad query rows would add their attention to the
    mass of the query block they share with a sequence's last real rows: that block's mass is
    recomputed on the sequence alone, so real rows select as without the pads.
    """
    mass = block_attention_mass(q, k, scale, cfg.block_size)
    if valid is not None:
        bs, T = cfg.block_size, q.shape[2]
        for b, length in enumerate(valid.sum(-1).tolist()):
            if length % bs and length < T:  # a partial last real block that shares its rows with pads
                i = length // bs
                alone = block_attention_mass(q[b : b + 1, :, :length], k[b : b + 1, :, :length], scale, bs)
                mass[b, :, i, : i + 1] = alone[0, :, i]
    index, count = select_key_blocks(mass, block_budget(cfg))
    return Selection("block", q.shape[2], block_index=index, block_count=count, block_size=cfg.block_size)
