"""Stage B: adapters start as the base and switch off exactly; merging keeps the outputs; training lowers the loss."""

import pytest
import torch

from conftest import tiny_model
from sea_convert.distill import StageATrainer
from sea_convert.finetune import StageBTrainer, hidden_mse, logit_kl
from sea_convert.integration import attach_sea, attention_mode
from sea_convert.lora import adapters_off, apply_lora, lora_layers, merge_lora
from sea_convert.recipe import SEAConfig, StageAConfig, StageBConfig


def _logits(model, ids, mode="dense"):
    with torch.no_grad(), attention_mode(model, mode):
        return model(input_ids=ids, use_cache=False).logits


def test_lora_starts_at_base_switches_off_and_merges():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 40))
    base = _logits(model, ids)
    layers = apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8)
    assert len(layers) == 4 * len(model.model.layers)
    assert torch.equal(_logits(model, ids), base)  # B = 0 at the start
    for layer in layers:
        torch.nn.init.normal_(layer.lora_b, std=0.05)
    adapted = _logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3  # measured 0.52
    with adapters_off(model):
        assert torch.equal(_logits(model, ids), base)
    assert merge_lora(model) == len(layers) and not lora_layers(model)
    err = (_logits(model, ids) - adapted).abs().max().item()
    print(f"merged vs adapters on: max |logit diff| {err:.2e}")
    assert err < 1e-4  # fp32 re-association of (W + s B A) x vs W x + s B (A x): measured 2.4e-7 (~1e-6 before)


def test_lora_rejects_unknown_targets():
    with pytest.raises(ValueError, match="lora_targets"):
        apply_lora(tiny_model("llama"), ["not_a_layer"], rank=2, alpha=2)


def test_losses_are_zero_for_identical_outputs():
    logits = torch.randn(2, 5, 11)
    assert float(logit_kl(logits, logits)) == pytest.approx(0.0, abs=1e-6)  # measured 0
    hidden = tuple(torch.randn(2, 5, 8) for _ in range(3))
    assert float(hidden_mse(hidden, hidden)) == 0.0
    assert float(logit_kl(logits, torch.zeros_like(logits))) > 0


@pytest.mark.parametrize("arch,mode,train_base", [("llama", "block", "lora"), ("opt", "per_query", "full"), ("qwen2", "block", "none")])
def test_stage_b_lowers_its_loss_and_keeps_the_teacher(arch, mode, train_base):
    model = tiny_model(arch)
    sea = SEAConfig(mode=mode, k=8, predictor_length=32, block_size=16, block_keys=16)
    attach_sea(model, sea)
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(0, 128, (2, 96), generator=g) for _ in range(4)]
    held_out = train[0]  # random tokens: what must fall is the objective on the data it trains on
    teacher_logits = _logits(model, held_out)
    a = StageATrainer(model, sea, StageAConfig(steps=10, lr=3e-3, warmup_steps=1))
    for i in range(10):
        a.step(train[i % 4])
    cfg = StageBConfig(steps=30, lr=1e-3, base_lr=3e-3, warmup_steps=2, train_base=train_base, lora_rank=4)
    b = StageBTrainer(model, sea, cfg)
    before = b.evaluate(held_out)
    for i in range(30):
        b.step(train[i % 4])
    after = b.evaluate(held_out)
    print(f"{arch}/{mode}/{train_base}: stage B loss {before.loss:.4f} -> {after.loss:.4f} "
          f"(logit KL {before.logit_kl:.4f} -> {after.logit_kl:.4f}), density {after.density:.3f}")
    # measured ratios 0.741 (llama, LoRA), 0.509 (opt, full), 0.830 (qwen2, predictors only): a 10% fall is asked
    # for. A 1e-6 relative jitter of every weight (10x fp32 rounding) moved them by <= 0.003, well inside the 0.07
    # left for qwen2; without training the ratio is 1
    assert after.loss < 0.9 * before.loss
    assert 0 < after.density < 1  # measured 0.45 (block), 0.175 (per-query)
    # the teacher stage B compares against is still the original model
    if train_base == "lora":
        with adapters_off(model):
            assert torch.equal(_logits(model, held_out), teacher_logits)
    elif train_base == "full":
        assert torch.equal(_logits(b.teacher, held_out), teacher_logits)
    else:
        assert torch.equal(_logits(model, held_out), teacher_logits)  # predictors only: base untouched
