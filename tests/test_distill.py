"""Stage A: one teacher pass per step, gradients only in predictors, the loss falls, memory is linear."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from sea_convert.distill import StageATrainer, estimate_kl
from sea_convert.integration import attach_sea
from sea_convert.recipe import SEAConfig, StageAConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("arch,mode,rows", [("llama", "block", "token"), ("qwen2", "per_query", "token"),
                                            ("opt", "block", "token"), ("mistral", "block", "block")])
def test_a_few_steps_lower_the_loss(arch, mode, rows):
    model = tiny_model(arch)
    sea = SEAConfig(mode=mode, k=16, predictor_length=32, block_size=16, predictor_rows=rows)
    attach_sea(model, sea)
    trainer = StageATrainer(model, sea, StageAConfig(steps=25, lr=3e-3, warmup_steps=2))
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(0, 128, (2, 96), generator=g) for _ in range(4)]
    held_out = torch.randint(0, 128, (2, 96), generator=g)
    before = trainer.evaluate(held_out)
    for step in range(25):
        trainer.step(train[step % 4])
    after = trainer.evaluate(held_out)
    print(f"{arch}/{mode}/{rows} rows: held-out loss {before.loss:.4f} -> {after.loss:.4f} (kl {before.kl:.4f} -> {after.kl:.4f})")
    # measured ratios 0.585 (llama), 0.576 (qwen2), 0.628 (opt), 0.298 (mistral, block rows): a 10% fall is asked for. A 1e-6
    # relative jitter of every weight (10x fp32 rounding) moved them by <= 0.006; without training the ratio is 1
    assert after.loss < 0.9 * before.loss


def test_one_teacher_pass_and_frozen_base():
    model = tiny_model("llama")
    sea = SEAConfig(k=16, predictor_length=32, block_size=16)
    attach_sea(model, sea)
    base_before = {n: p.clone() for n, p in model.named_parameters() if "sea_predictor" not in n}
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    trainer = StageATrainer(model, sea, StageAConfig(steps=3, lr=1e-2, warmup_steps=0))
    pred_before = [p.clone() for p in trainer.params]
    for _ in range(3):
        trainer.step(torch.randint(0, 128, (1, 64)))
    assert len(calls) == 3  # one teacher forward per step, for all layers at once
    for n, p in model.named_parameters():
        if "sea_predictor" not in n:
            assert p.grad is None and torch.equal(p, base_before[n]), n
    moved = sum(not torch.equal(a, b) for a, b in zip(pred_before, trainer.params))
    assert moved > 0.8 * len(pred_before)  # the predictors (and gates) do learn


def test_kl_ignores_empty_bins_and_is_zero_at_the_target():
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    logp = torch.log(torch.tensor([[0.5, 0.5, 1e-30, 0.0]])).masked_fill(torch.tensor([[False, False, False, True]]), float("-inf"))
    assert float(estimate_kl(target, logp)) == pytest.approx(0.0, abs=1e-6)  # measured 0
    # KL([.5, .5, 0, 0] || uniform) = ln 2; fp32: measured 1.9e-9 off
    assert float(estimate_kl(target, torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]])))) == pytest.approx(math.log(2), abs=1e-6)
    # the fused GPU target can leave -1e-9 of rounding in an empty bin: the KL stays finite (seen as NaN on an H100)
    rounding = torch.tensor([[0.5, 0.5, -1e-9, 0.0]])
    assert torch.isfinite(estimate_kl(rounding, torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))))


def test_teacher_target_memory_grows_linearly(monkeypatch):
    from teacher_target_memory import measure

    if not os.access("/proc/self/clear_refs", os.W_OK):  # the child resets its peak RSS through it
        pytest.skip("/proc/self/clear_refs is not writable here (the peak RSS cannot be reset)")
    # one thread in the child: per-thread BLAS buffers would otherwise add to the peak with the core count
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = [measure(T) for T in (1024, 2048, 4096)]
    for r in rows:
        print(r)
    peaks = [r["peak_mib"] for r in rows]
    # linear growth: 4x the tokens costs ~4x the memory (quadratic would be 16x); 8 sits 2x from either.
    # Measured peaks 50-52, 99-102, 193-198 MiB (ratio 3.78 .. 3.85; docs/teacher_target_memory.json: 3.8):
    # the chunked working set (4-5 score-sized tensors of 256 query rows x T keys) plus the output
    assert peaks[2] / peaks[0] < 8
    # below even one dense T x T score tensor of one head group: measured 193-198 < 576 MiB (a query chunk
    # is 1/16 of the rows at T = 4096; a dense computation would need over 576)
    assert peaks[2] < rows[2]["dense_scores_mib"]


def test_micro_batches_accumulate_the_whole_batch_gradient():
    """micro_batch_size bounds memory (one teacher pass per micro-batch), not the result."""
    grads, losses = [], []
    batch = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(5))
    for micro in (None, 1, 3):
        torch.manual_seed(0)
        model = tiny_model("llama")
        sea = SEAConfig(k=16, predictor_length=32, block_size=16)
        attach_sea(model, sea)
        trainer = StageATrainer(model, sea, StageAConfig(steps=2, batch_size=4, micro_batch_size=micro, lr=3e-3))
        captured = []
        trainer.grad_sync = lambda: captured.append(torch.cat([p.grad.reshape(-1) for p in trainer.params]).clone())
        losses.append(trainer.step(batch).loss)
        grads.append(captured[0])
    gaps = [((g - grads[0]).norm() / grads[0].norm()).item() for g in grads[1:]]
    print(f"micro-batches 1 and 3 (of 4 rows) vs the whole batch: gradient rel. gap {gaps}, losses {losses}")
    assert max(gaps) < 1e-5  # float32 summation order only; measured 1.6e-7 .. 1.8e-7
    # the losses: measured relative gaps 5.3e-8, 8.0e-8
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
