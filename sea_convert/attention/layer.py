"""The SEA attention function: estimate -> select -> sparse attention -> output gates.

Registered in transformers' AttentionInterface as "sea" (see sea_convert.integration);
the predictor weights live in the attention module as `module.sea_predictor`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field

import torch

from kernels import dispatch
from kernels.reference_gates import mix_gated, running_mean
from sea_convert.attention.losses import active_sink, estimate_kl, estimate_target
from sea_convert.attention.predictor import Estimate, SEAPredictor
from sea_convert.attention.select import Selection, select
from sea_convert.recipe import SEAConfig


@dataclass
class DensityMeter:
    """Counts kept vs causal attention entries over every SEA call inside `measure_density()`."""

    kept: float = 0.0
    causal: float = 0.0
    per_layer: dict[int, list[float]] = field(default_factory=dict)

    def add(self, layer: int, sel: Selection) -> None:
        kept, causal = sel.density()
        self.kept += kept
        self.causal += causal
        acc = self.per_layer.setdefault(layer, [0.0, 0.0])
        acc[0] += kept
        acc[1] += causal

    @property
    def density(self) -> float:
        return self.kept / self.causal if self.causal else float("nan")


_meter: contextvars.ContextVar[DensityMeter | None] = contextvars.ContextVar("sea_density_meter", default=None)


@contextlib.contextmanager
def measure_density():
    meter = DensityMeter()
    token = _meter.set(meter)
    try:
        yield meter
    finally:
        _meter.reset(token)


def mix_output(sparse_out, gates, kept, v) -> torch.Tensor:
    """The output gates (kernels.reference_gates.mix_gated) over whole sequences: kept (B, Hkv, T),
    the running mean of v (B, Hkv, T, d) and row t's t+1 from the rows themselves."""
    T = sparse_out.shape[2]
    rows = torch.arange(1, T + 1, device=kept.device, dtype=torch.float32)
    return mix_gated(sparse_out, gates, kept, running_mean(v), rows)


@functools.cache
def _compiled_mix():
    """The gates mix is pure elementwise work: compiled, it is one pass instead of ~10 (sea.compile on CUDA)."""
    return torch.compile(mix_output, dynamic=True)


@dataclass
class SEAOutput:
    out: torch.Tensor  # (B, Hq, T, d) fp32; in q's dtype from the gated kernel (block rows at inference)
    estimate: Estimate
    selection: Selection


def sea_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, predictor: SEAPredictor, cfg: SEAConfig, scale: float, layer: int = -1,
    valid: torch.Tensor | None = None, keep_image: bool = False,
) -> SEAOutput:
    """One SEA layer on (B, Hq, T, d) queries and (B, Hkv, T, d) keys/values, causal.

    valid: (B, T) bool of a right-padded batch (real tokens first): pads then leave the real
    positions' outputs as they are without them (see `select`). keep_image: keep the CNN's input
    on the estimate (the decoder's prefill takes its last rows)."""
    ops = dispatch.ops(cfg.backend, q.device)
    # The predictor reads the attention inputs detached: in stage B the base weights learn from the
    # sparse attention and the model-level losses, not from making the predictor's task easier.
    est = predictor(q.detach(), k.detach(), v.detach(), scale, ops, keep_image=keep_image)
    sink = active_sink()
    if sink is not None:
        target = estimate_target(q.detach(), k.detach(), scale, cfg, sink.query_chunk, ops)
        sink.losses.append(estimate_kl(target, est.log_probs))
    T = q.shape[2]
    probs = est.grouped_probs if est.grouped_probs is not None else est.log_probs.detach().exp()
    sel = select(probs, cfg, k.shape[1], ops, valid=valid, seq_len=T)
    if est.gates is not None and est.block_size is not None and not torch.is_grad_enabled():
        # block rows at inference: the block's gates applied by the attention op (on the GPU a pass over its
        # output, or its epilogue: GATES_IN_EPILOGUE), written in the model's dtype (the model rounds to it anyway;
        # fp32 doubled the output's writes)
        out = ops.block_sparse_attention_gated(q, k, v, sel.block_index, sel.block_count, sel.block_size, scale,
                                               est.gates, out_dtype=q.dtype)
    else:
        sparse_out, _ = sel.attend(q, k, v, scale, ops)
        mix = _compiled_mix() if cfg.compile and q.is_cuda else mix_output
        gates = est.per_query_gates(T)
        out = mix(sparse_out, gates, sel.kept, v) if gates is not None else sparse_out.float()
    meter = _meter.get()
    if meter is not None:
        meter.add(layer, sel)
    return SEAOutput(out, est, sel)


def oracle_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SEAConfig, scale: float, layer: int = -1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse attention over the true top blocks (no predictor, no gates): the quality ceiling at a budget."""
    from sea_convert.attention.select import oracle_select

    ops = dispatch.ops(cfg.backend, q.device)
    sel = oracle_select(q, k, scale, cfg, valid=valid)
    out, _ = sel.attend(q, k, v, scale, ops)
    meter = _meter.get()
    if meter is not None:
        meter.add(layer, sel)
    return out
