"""Stage A distillation: frozen teacher, every layer's predictor trained from one teacher pass.

Per batch: one dense forward pass of the teacher captures each layer's q, k, v and
attention output (no grad). Then, layer by layer, the predictor sees the teacher's
own q, k, v; its loss is
    kl_weight * KL(teacher attention pooled into K bins || estimate)
  + output_mse_weight * relative MSE(SEA output, teacher attention output)
and is back-propagated at once, so only one layer's graph is alive at a time.
Gradients stay inside the predictors. The target is computed in query chunks
(no T x T tensor). Nothing here knows about devices beyond the tensors it is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from kernels import dispatch
from sea_convert.attention import SEAPredictor, sea_attention
from sea_convert.attention.losses import estimate_kl, estimate_target
from sea_convert.integration import Captured, capture_attention, predictors
from sea_convert.recipe import SEAConfig, StageAConfig
from sea_convert.trainer_base import TrainerBase


@dataclass
class LayerLoss:
    total: torch.Tensor
    # detached, left on the device: reading them would stall the host on every layer
    kl: torch.Tensor
    mse: torch.Tensor
    density: torch.Tensor


@dataclass
class StepMetrics:
    step: int
    loss: float
    kl: float
    mse: float
    density: float
    lr: float
    tokens: int
    seconds: float


def relative_mse(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean over windows of each window's |out - ref|^2 / |ref|^2: relative, so layers are comparable, and
    per window, so the loss is a mean over rows and data parallelism over rows computes it exactly."""
    dims = tuple(range(1, out.ndim))
    return ((out - ref).pow(2).mean(dims) / ref.pow(2).mean(dims).clamp_min(1e-12)).mean()


def layer_loss(predictor: SEAPredictor, cap: Captured, sea_cfg: SEAConfig, stage: StageAConfig) -> LayerLoss:
    ops = dispatch.ops(sea_cfg.backend, cap.q.device)
    target = estimate_target(cap.q, cap.k, cap.scale, sea_cfg, stage.query_chunk, ops)
    res = sea_attention(cap.q, cap.k, cap.v, predictor, sea_cfg, cap.scale)
    kl = estimate_kl(target, res.estimate.log_probs)
    mse = relative_mse(res.out, cap.out.float())
    total = stage.kl_weight * kl + stage.output_mse_weight * mse
    return LayerLoss(total, kl.detach(), mse.detach(), res.selection.kept_fraction())


class StageATrainer(TrainerBase):
    """Owns the optimizer of the predictors; `step(batch)` runs one optimizer step."""

    def __init__(self, model: nn.Module, sea_cfg: SEAConfig, stage: StageAConfig):
        self.model, self.sea_cfg, self.stage = model, sea_cfg, stage
        self.predictors = predictors(model)
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for pred in self.predictors for p in pred.parameters()]
        for p in params:
            p.requires_grad_(True)
        self._build_optimizer([{"params": params, "lr": stage.lr}], stage.weight_decay, stage.warmup_steps, stage.steps)

    def _teacher_pass(self, input_ids: torch.Tensor) -> dict[int, Captured]:
        base = getattr(self.model, "model", self.model)  # skip the LM head: only attention is needed
        with torch.no_grad(), capture_attention(self.model) as captured:
            base(input_ids=input_ids, use_cache=False)
        return captured

    def _layer_losses(self, input_ids: torch.Tensor, backward: bool) -> dict[str, float]:
        """Means over layers of each layer's loss, over micro-batches of the rows (each weighted by its
        share of the rows: every loss term is a mean over windows, so this is the whole batch's loss)."""
        means = {"loss": 0.0, "kl": 0.0, "mse": 0.0, "density": 0.0}
        rows = input_ids.shape[0]
        for part in input_ids.split(self.stage.micro_batch_size or rows):
            share = part.shape[0] / rows
            for key, value in self._micro_batch_losses(part, backward, share).items():
                means[key] += value * share
        return means

    def _micro_batch_losses(self, input_ids: torch.Tensor, backward: bool, weight: float) -> dict[str, float]:
        """One teacher pass, then each layer's loss (back-propagated at once, times `weight`, if asked).
        The layer means stay on the device until the end: one host sync per micro-batch, not per layer."""
        captured = self._teacher_pass(input_ids)
        n = len(self.predictors)
        sums = torch.zeros(4, device=input_ids.device, dtype=torch.float64)
        for idx in sorted(captured):
            ll = layer_loss(self.predictors[idx], captured.pop(idx), self.sea_cfg, self.stage)
            if backward and ll.total.requires_grad:  # False only when no loss term reaches a parameter
                (ll.total * (weight / n)).backward()
            sums += torch.stack([ll.total.detach(), ll.kl, ll.mse, ll.density.to(ll.kl.dtype)]).double()
        loss, kl, mse, density = (sums / n).tolist()
        return {"loss": loss, "kl": kl, "mse": mse, "density": density}

    def _metrics(self, means: dict[str, float], lr: float, input_ids: torch.Tensor, t0: float) -> StepMetrics:
        return StepMetrics(self.step_count, means["loss"], means["kl"], means["mse"], means["density"], lr,
                           int(input_ids.numel()), time.perf_counter() - t0)

    def step(self, input_ids: torch.Tensor) -> StepMetrics:
        t0 = time.perf_counter()
        self.model.eval()
        for pred in self.predictors:
            pred.train()
        self.optimizer.zero_grad(set_to_none=True)
        means = self._layer_losses(input_ids, backward=True)
        lr = self._optimizer_step(self.stage.grad_clip)
        return self._metrics(means, lr, input_ids, t0)

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor) -> StepMetrics:
        """The same losses on a batch without updating anything (held-out distillation loss)."""
        t0 = time.perf_counter()
        for pred in self.predictors:
            pred.eval()
        means = self._layer_losses(input_ids, backward=False)
        return self._metrics(means, self.optimizer.param_groups[0]["lr"], input_ids, t0)
