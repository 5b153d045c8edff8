"""On a GPU: dispatch picks Triton by itself, distillation runs on the fused kernels, SEA equals dense at full budget."""

import logging

import pytest
import torch

from conftest import tiny_model
from kernels import dispatch, reference
from sea_convert.distill import StageATrainer
from sea_convert.integration import attach_sea, attention_mode
from sea_convert.recipe import SEAConfig, StageAConfig

pytestmark = pytest.mark.gpu


def test_dispatch_picks_triton_on_cuda_and_logs_once(caplog):
    from kernels import triton_ops

    dispatch._announced.clear()
    with caplog.at_level(logging.INFO, logger="sea_convert.kernels"):
        assert dispatch.ops("auto", torch.device("cuda")) is triton_ops
        assert dispatch.ops("auto", torch.device("cuda")) is triton_ops
        assert dispatch.ops("torch", torch.device("cuda")) is reference  # a recipe can force the reference
        assert dispatch.ops("auto", torch.device("cpu")).block_sparse_attention is not reference.block_sparse_attention
    said = [r.getMessage() for r in caplog.records]
    assert said.count("SEA attention on cuda: Triton kernels") == 1


def test_stage_a_on_gpu_uses_the_fused_kernels_and_learns(monkeypatch):
    from kernels import triton_ops

    calls = {"teacher_target": 0, "block_sparse_attention": 0}
    for name in calls:
        real = getattr(triton_ops, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(triton_ops, name, counted)
    model = tiny_model("llama").cuda()
    sea = SEAConfig(mode="block", k=32, predictor_length=64, block_size=32)
    attach_sea(model, sea)
    trainer = StageATrainer(model, sea, StageAConfig(steps=30, lr=3e-3, warmup_steps=2))
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(0, 128, (2, 256), generator=g).cuda() for _ in range(4)]
    held_out = torch.randint(0, 128, (2, 256), generator=g).cuda()
    before = trainer.evaluate(held_out)
    for step in range(30):
        trainer.step(train[step % 4])
    after = trainer.evaluate(held_out)
    print(f"GPU stage A held-out loss {before.loss:.4f} -> {after.loss:.4f}; kernel calls {calls}")
    # measured on an H100: 0.762 -> 0.366 (ratio 0.48; the CPU reference ops give the same); a 10% fall is asked for
    assert after.loss < 0.9 * before.loss
    assert calls["teacher_target"] >= 30 * 2 and calls["block_sparse_attention"] >= 30 * 2  # 2 layers per step


@pytest.mark.parametrize("mode", ["block", "per_query"])
def test_full_budget_equals_dense_on_gpu(mode):
    model = tiny_model("llama").cuda()
    ids = torch.randint(0, 128, (2, 250), device="cuda")  # per-query k=256 covers rows up to 256
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
    attach_sea(model, SEAConfig(mode=mode, k=256, predictor_length=256, block_size=32, block_keys=512))
    with torch.no_grad(), attention_mode(model, "sea"):
        sea = model(ids, use_cache=False).logits
    err = (sea - dense).abs().max().item()
    print(f"GPU {mode}: full-budget max |logit error| {err:.2e}")
    assert err < 1e-3  # fp32; the kernels use exact fp32 products: measured 1.8e-7 .. 2.7e-7 on an H100


def test_linear_attention_at_model_shape():
    """Triton linear attention vs the reference at the estimator's real shape (d=128 -> 77 features, 2d values)."""
    from kernels import linear_attention as la

    g = torch.Generator(device="cuda").manual_seed(0)
    qf = torch.rand(1, 32, 4096, 77, device="cuda", generator=g)
    kf = torch.rand(1, 8, 4096, 77, device="cuda", generator=g)
    v = torch.randn(1, 8, 4096, 256, device="cuda", generator=g)
    got = la.causal_linear_attention(qf, kf, v)
    want = reference.causal_linear_attention(qf.double(), kf.double(), v.double()).float()
    rel = ((got - want).norm() / want.norm()).item()
    print(f"linear attention at model shape: relative error {rel:.2e}")
    # tl.dot of fp32 runs as tf32 (operands rounded to 2^-11 relative): measured 1.1e-3 on an H100 (9x). Dropping
    # one 64-key chunk from the prefixes gives 4.2e-2, an off-by-one prefix 0.48 (measured on the reference)
    assert rel < 1e-2


def test_block_rows_layer_makes_no_host_sync_and_replays_from_a_cuda_graph():
    """The block-row SEA layer (inference, bf16, T not a multiple of the block) runs with CUDA's sync debug
    mode set to error, and captured once in a CUDA graph it gives, for new inputs copied into its buffers,
    what the eager layer gives."""
    from sea_convert.attention import SEAPredictor, sea_attention

    T, H, Hkv, d = 3000, 8, 2, 64
    cfg = SEAConfig(mode="block", predictor_rows="block", k=64, block_size=64, block_keys=512, predictor_length=64,
                    backend="triton", position_table_len=4096)
    pred = SEAPredictor(cfg, H, Hkv, d, 4096, 0).cuda().to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = lambda: [torch.randn(1, h, T, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H, Hkv, Hkv)]  # noqa: E731
    static, fresh = inputs(), inputs()
    layer = lambda q, k, v: sea_attention(q, k, v, pred, cfg, d ** -0.5).out  # noqa: E731
    with torch.no_grad():
        layer(*static)  # Triton compiles, caches fill
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            want = layer(*fresh)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(*static)
        for buf, x in zip(static, fresh):
            buf.copy_(x)
        graph.replay()
        other = layer(*inputs())
    err = (out - want).abs().max().item()
    print(f"block-row layer from a CUDA graph vs eager: max |error| {err:.2e}")
    assert err < 1e-5  # the same kernels on the same inputs: measured 0
    assert not torch.allclose(out, other, atol=1e-2)  # the output depends on the inputs: the replay read the new ones


@pytest.mark.parametrize("mode", ["sea", "dense"])
def test_captured_decoding_makes_the_eager_tokens(mode):
    """sea_convert.captured.CapturedDecoding: every step replayed from one of its CUDA graphs (SEA block rows: the
    block-opening step and the others, both crossed several times) makes the tokens of the same loop run eagerly,
    and of transformers' generate() with a static cache; bf16, compiled predictors and decode step."""
    from sea_convert.captured import CapturedDecoding
    from sea_convert.integration import compile_predictors

    model = tiny_model("llama").cuda().to(torch.bfloat16)
    attach_sea(model, SEAConfig(mode="block", k=32, block_keys=64, block_size=32, predictor_length=64,
                                predictor_rows="block", backend="triton", compile=True))
    compile_predictors(model)
    model.generation_config.eos_token_id = None
    model.generation_config.disable_compile = True  # the reference is generate() as it runs eagerly
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(2)).cuda()
    captured = CapturedDecoding(model, mode)
    replayed = captured.generate(ids, 100)  # positions 300..399: three block openings
    assert set(captured.graphs) == ({True, False} if mode == "sea" else {None})
    eager = CapturedDecoding(model, mode, graphs=False).generate(ids, 100)
    with torch.no_grad(), attention_mode(model, mode):
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=100, min_new_tokens=100,
                                   do_sample=False, cache_implementation="static")
    assert torch.equal(replayed, eager) and torch.equal(eager, reference)
    assert len(set(replayed[0, 300:].tolist())) > 1  # not one token repeated: the steps read their new inputs


@pytest.mark.parametrize("mode", ["sea", "dense"])
def test_captured_prefill_replays_the_eager_forward(mode):
    """sea_convert.captured.CapturedPrefill: the whole model in a CUDA graph (block rows, compiled predictors, bf16)
    gives the eager forward's last-position logits, for the ids it was captured with and for new ids copied in;
    the capture would have failed before SEA's mask builder (transformers' mask read back = a host sync)."""
    from sea_convert.captured import CapturedPrefill
    from sea_convert.integration import compile_predictors

    model = tiny_model("llama").cuda().to(torch.bfloat16)
    attach_sea(model, SEAConfig(mode="block", k=32, block_keys=64, block_size=32, predictor_length=64,
                                predictor_rows="block", backend="triton", compile=True))
    compile_predictors(model)
    captured = CapturedPrefill(model, batch_size=2, seq_len=300, mode=mode)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 300), generator=g).cuda()
        with torch.no_grad(), attention_mode(model, mode):
            eager = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        replayed = captured(ids)
        # the same kernels on the same inputs, so equal is expected: prefill_bench's replays at the 13B and SmolLM2
        # shapes measured 0.0 (H100); this test passed on the H100 under one bf16 step of the logits' scale
        assert (replayed.float() - eager.float()).abs().max() <= 2 ** -7 * (1 + eager.float().abs().max())
    with pytest.raises(ValueError, match="captured for"):
        captured(ids[:, :100])


def test_block_row_stage_a_repeats_itself_bit_for_bit_on_the_gpu():
    """Issue 24: the GPU service run's loss history differed from the in-process run's from step 1 (6e-7, then
    up to 8e-4), so a resumed run could not be held to an uninterrupted one. The block-row teacher targets now sum
    without atomics and cuDNN runs its deterministic algorithms (workers.train.loop.seed_and_pin_kernels): two
    runs of the same steps give the same losses, bit for bit."""
    from workers.train.loop import seed_and_pin_kernels

    sea = SEAConfig(mode="block", k=16, block_keys=64, predictor_length=16, predictor_rows="block", block_size=32)
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(0, 128, (2, 512), generator=g).cuda() for _ in range(3)]

    def losses() -> list[float]:
        seed_and_pin_kernels(0)
        model = tiny_model("llama").cuda()
        attach_sea(model, sea)
        trainer = StageATrainer(model, sea, StageAConfig(steps=12, lr=3e-3, warmup_steps=2))
        return [trainer.step(train[step % 3]).loss for step in range(12)]

    first, second = losses(), losses()
    assert first == second, [abs(a - b) for a, b in zip(first, second)]
    q, k = torch.randn(2, 4, 700, 64, device="cuda"), torch.randn(2, 2, 700, 64, device="cuda")
    ops = dispatch.ops("auto", q.device)
    targets = [ops.block_teacher_target(q, k, 64 ** -0.5, 16, 64, query_chunk=256) for _ in range(3)]
    assert all(torch.equal(targets[0], t) for t in targets[1:])
