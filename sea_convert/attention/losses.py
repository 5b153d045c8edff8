"""Losses on the compressed estimate, shared by stage A (teacher attention) and stage B (student's own)."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch


def estimate_target(q: torch.Tensor, k: torch.Tensor, scale: float, cfg, query_chunk: int, ops) -> torch.Tensor:
    """The teacher's attention on the estimate's grid (no grad): each query's row pooled into its K bins
    (token rows), or each query block's mean row pooled into the K bins of its key blocks (block rows)."""
    with torch.no_grad():
        if cfg.predictor_rows == "block":
            return ops.block_teacher_target(q, k, scale, cfg.predictor_length, cfg.block_size, query_chunk)
        return ops.teacher_target(q, k, scale, cfg.predictor_length, query_chunk)[0]


def estimate_kl(target: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target || estimate); bins the target leaves empty contribute 0."""
    target = target.clamp_min(0.0)  # xlogy of a rounding-negative bin would be NaN
    has_mass = target > 0
    safe_log = torch.where(has_mass, log_probs, torch.zeros_like(log_probs))
    kl = torch.xlogy(target, target) - target * safe_log
    return kl.sum(-1).mean()


@dataclass
class EstimateLossSink:
    """Collects, per SEA call, KL(the layer's own dense attention pooled into K bins || its estimate)."""

    query_chunk: int = 512
    losses: list[torch.Tensor] = field(default_factory=list)

    def mean(self) -> torch.Tensor | None:
        return torch.stack(self.losses).mean() if self.losses else None


_sink: contextvars.ContextVar[EstimateLossSink | None] = contextvars.ContextVar("sea_estimate_loss_sink", default=None)


@contextlib.contextmanager
def collect_estimate_losses(query_chunk: int = 512):
    """SEA attention calls inside the block add their estimate KL to the yielded sink (stage B)."""
    sink = EstimateLossSink(query_chunk)
    token = _sink.set(sink)
    try:
        yield sink
    finally:
        _sink.reset(token)


def active_sink() -> EstimateLossSink | None:
    return _sink.get()
