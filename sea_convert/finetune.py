"""Stage B: end-to-end fine-tuning with the student's SEA attention in the loop.

Per batch: the teacher (base weights as before stage B, dense attention, no grad) gives logits
and every layer's hidden state; the student (SEA attention, adapters on) runs the same batch
with gradients. Loss:
    logit_kl_weight * KL(teacher next-token distribution || student's)   mean over tokens
  + hidden_mse_weight * relative MSE of each layer's hidden state         mean over layers
  + lm_weight * next-token cross-entropy
  + estimate_kl_weight * KL(student's own attention pooled into K bins || estimate)   mean over layers
The selection itself is not differentiable: the predictors learn here through their output gates
and the estimate KL; the base weights (LoRA or all) learn to work with the sparse attention.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sea_convert.attention import measure_density
from sea_convert.attention.losses import collect_estimate_losses
from sea_convert.integration import attention_mode, predictors
from sea_convert.lora import adapters_off, apply_lora
from sea_convert.recipe import SEAConfig, StageBConfig
from sea_convert.trainer_base import TrainerBase


@dataclass
class StageBMetrics:
    step: int
    loss: float
    logit_kl: float
    hidden_mse: float
    lm: float
    estimate_kl: float
    density: float
    lr: float
    tokens: int
    seconds: float


def logit_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(student)), in fp32."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def hidden_mse(teacher_hidden: tuple[torch.Tensor, ...], student_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over layers of MSE / mean square of the teacher's state (layer outputs only, not the embeddings)."""
    terms = []
    for t, s in zip(teacher_hidden[1:], student_hidden[1:], strict=True):
        t = t.float()
        terms.append((s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


class StageBTrainer(TrainerBase):
    def __init__(self, model: nn.Module, sea_cfg: SEAConfig, cfg: StageBConfig):
        self.model, self.sea_cfg, self.cfg = model, sea_cfg, cfg
        self.predictors = predictors(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.teacher: nn.Module | None = None  # None: the same model with its adapters off
        base_params: list[nn.Parameter] = []
        if cfg.train_base == "lora":
            for layer in apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha):
                base_params += [layer.lora_a, layer.lora_b]
        elif cfg.train_base == "full":
            self.teacher = copy.deepcopy(model).eval()  # frozen copy before anything moves
            pred_ids = {id(p) for pred in self.predictors for p in pred.parameters()}
            base_params = [p for p in model.parameters() if id(p) not in pred_ids]
        pred_params = [p for pred in self.predictors for p in pred.parameters()]
        for p in pred_params + base_params:
            p.requires_grad_(True)
        groups = [{"params": pred_params, "lr": cfg.lr}]
        if base_params:
            groups.append({"params": base_params, "lr": cfg.base_lr})
        self._build_optimizer(groups, cfg.weight_decay, cfg.warmup_steps, cfg.steps)

    @torch.no_grad()
    def _teacher_outputs(self, input_ids: torch.Tensor):
        if self.teacher is not None:
            with attention_mode(self.teacher, "dense"):
                return self.teacher(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        with adapters_off(self.model), attention_mode(self.model, "dense"):
            return self.model(input_ids=input_ids, use_cache=False, output_hidden_states=True)

    def _losses(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        teacher = self._teacher_outputs(input_ids)
        with attention_mode(self.model, "sea"), measure_density() as meter, \
                collect_estimate_losses(cfg.query_chunk) as sink:
            student = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        zero = student.logits.new_zeros((), dtype=torch.float32)
        terms = {
            "logit_kl": logit_kl(teacher.logits, student.logits) if cfg.logit_kl_weight else zero,
            "hidden_mse": hidden_mse(teacher.hidden_states, student.hidden_states) if cfg.hidden_mse_weight else zero,
            "lm": F.cross_entropy(student.logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
            if cfg.lm_weight else zero,
            "estimate_kl": sink.mean() if cfg.estimate_kl_weight and sink.losses else zero,
        }
        total = (cfg.logit_kl_weight * terms["logit_kl"] + cfg.hidden_mse_weight * terms["hidden_mse"]
                 + cfg.lm_weight * terms["lm"] + cfg.estimate_kl_weight * terms["estimate_kl"])
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["density"] = meter.density
        return total, values

    def _metrics(self, total: torch.Tensor, values: dict, lr: float, input_ids: torch.Tensor, t0: float) -> StageBMetrics:
        return StageBMetrics(self.step_count, float(total.detach()), values["logit_kl"], values["hidden_mse"],
                             values["lm"], values["estimate_kl"], values["density"], lr, int(input_ids.numel()),
                             time.perf_counter() - t0)

    def step(self, input_ids: torch.Tensor) -> StageBMetrics:
        t0 = time.perf_counter()
        self.model.eval()  # no dropout: teacher and student must see the same network (OPT has dropout)
        self.optimizer.zero_grad(set_to_none=True)
        total, values = self._losses(input_ids)
        total.backward()
        lr = self._optimizer_step(self.cfg.grad_clip)
        return self._metrics(total, values, lr, input_ids, t0)

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor) -> StageBMetrics:
        t0 = time.perf_counter()
        self.model.eval()
        total, values = self._losses(input_ids)
        return self._metrics(total, values, self.optimizer.param_groups[0]["lr"], input_ids, t0)
