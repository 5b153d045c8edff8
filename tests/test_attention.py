"""The SEA layer inside real transformers models: equivalence, causality, probabilities, GQA, modes."""

import pytest
import torch

from conftest import tiny_model
from sea_convert.attention import measure_density
from sea_convert.integration import (
    UnsupportedArchitecture,
    attach_sea,
    attention_mode,
    capture_attention,
    predictors,
)
from sea_convert.recipe import SEAConfig

ARCHS = ["llama", "mistral", "qwen2", "opt"]
MODES = ["block", "per_query"]


def _full_budget(mode: str) -> SEAConfig:
    # k = K and a budget of 512 keys covers every causal key of sequences up to 512 tokens
    return SEAConfig(mode=mode, k=256, predictor_length=256, block_size=16)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_full_budget_equals_dense(arch, mode):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (2, 203))  # not a multiple of the block size
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
    attach_sea(model, _full_budget(mode))
    # the gates are trained in practice: randomise them to show they reduce to dense at full budget
    for pred in predictors(model):
        torch.nn.init.normal_(pred.gates.weight, std=0.5)
        torch.nn.init.normal_(pred.gates.bias, std=0.5)
    with torch.no_grad(), attention_mode(model, "sea"), measure_density() as meter:
        sea = model(ids, use_cache=False).logits
    err = (sea - dense).abs().max().item()
    print(f"{arch}/{mode}: full-budget max |logit error| = {err:.2e}, density {meter.density:.3f}")
    assert meter.density == pytest.approx(1.0)  # a ratio of key counts: exactly 1
    assert err < 1e-4  # measured 1.8e-7 .. 2.4e-7 (fp32 summation order)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("mode", MODES)
def test_causal(arch, mode):
    """Perturbing tokens after position t leaves every output at positions <= t unchanged."""
    model = tiny_model(arch)
    attach_sea(model, SEAConfig(mode=mode, k=16, predictor_length=64, block_size=16))
    ids = torch.randint(0, 128, (1, 150))
    t = 97
    other = ids.clone()
    other[0, t + 1:] = torch.randint(0, 128, (150 - t - 1,))
    with torch.no_grad(), attention_mode(model, "sea"), measure_density() as meter:
        a = model(ids, use_cache=False).logits
        b = model(other, use_cache=False).logits
    assert meter.density < 0.7  # really sparse, so selection is exercised (measured 0.23 .. 0.30)
    err = (a[0, : t + 1] - b[0, : t + 1]).abs().max().item()
    print(f"{arch}/{mode}: causality max error {err:.2e}")
    assert err == 0.0  # exact: rows <= t see bit-identical inputs, and masked terms are exact zeros
    assert (a[0, t + 1:] - b[0, t + 1:]).abs().max() > 1e-3  # and later positions do change (measured 0.8 .. 1.1)


def _captured_layer(arch="llama", T=150):
    model = tiny_model(arch)
    attach_sea(model, SEAConfig(mode="block", k=16, predictor_length=64, block_size=16))
    with torch.no_grad(), capture_attention(model) as cap:
        model(torch.randint(0, 128, (2, T)), use_cache=False)
    return model, cap[0]


def test_estimate_rows_are_distributions():
    from kernels import reference

    model, c = _captured_layer()
    pred = predictors(model)[0]
    est = pred(c.q, c.k, c.v, c.scale, reference)
    probs = est.log_probs.exp()
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-5)  # measured |sum - 1| <= 2.4e-7
    # empty bins of short rows (t + 1 < K) get exactly zero mass
    assert probs[:, :, 0, 1:].abs().max() == 0
    target, _ = reference.teacher_target(c.q, c.k, c.scale, 64, query_chunk=37)
    assert torch.allclose(target.sum(-1), torch.ones_like(target[..., 0]), atol=1e-5)  # measured <= 5.4e-7


@pytest.mark.parametrize("mode", MODES)
def test_sparse_rows_sum_to_one_and_gqa_shares_selection(mode):
    from kernels import reference
    from sea_convert.attention import sea_attention

    model, c = _captured_layer()
    cfg = SEAConfig(mode=mode, k=16, predictor_length=64, block_size=16)
    res = sea_attention(c.q, c.k, c.v, predictors(model)[0], cfg, c.scale)
    sel = res.selection
    assert c.q.shape[1] == 4 and c.k.shape[1] == 2  # GQA: 2 query heads per KV head
    # the selection is per KV head (shared by its query heads)
    assert sel.kept.shape == (2, 2, 150)
    # probabilities over the selected keys sum to one: attention of v = 1 returns 1
    ones = torch.ones_like(c.v)
    out, lse = sel.attend(c.q, c.k, ones, c.scale, reference)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)  # measured |out - 1| <= 4.2e-7
    assert torch.isfinite(lse).all()
    # every row keeps its own key (diagonal), never more than its causal prefix
    rows = torch.arange(1, 151)
    assert (sel.kept >= 1).all() and (sel.kept <= rows).all()
    assert (sel.kept < rows).any()  # and something was dropped


def test_grouped_budget_is_shared_across_heads():
    from kernels import reference
    from kernels.block_budget import BlockBudget

    # a head whose estimate is confident gets the shared budget; the other keeps only forced blocks
    B, H, T, K, bs = 1, 2, 256, 64, 16
    est = torch.full((B, H, T, K), 1.0 / K)
    est[:, 0] = 0
    est[:, 0, :, [10, 20, 30, 40]] = 0.25  # head 0: mass on 4 distinct key blocks of the last query block
    scores = reference.pool_key_block_scores(est, bs)
    index, count = reference.select_key_blocks(scores, BlockBudget(per_head=4, sink_blocks=1, local_blocks=1))
    last = count[0, :, -1]
    assert int(last.sum()) == 2 * 4  # the budget is shared: 2 heads x 4 blocks in all
    # head 0 takes all 4 free places (0.25 per block beats head 1's uniform 1/16); head 1 keeps sink + local
    assert (int(last[0]), int(last[1])) == (6, 2)


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitecture, match="llama, mistral, qwen2, opt"):
        attach_sea(model, SEAConfig())


def test_sea_refuses_a_cache_it_did_not_prefill():
    """Decoding continues a SEA prefill; a cache filled by dense attention has no SEA state to continue."""
    model = tiny_model("llama")
    attach_sea(model, SEAConfig(k=16, predictor_length=64, block_size=16))
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        with attention_mode(model, "dense"):
            prefill = model(ids[:1], use_cache=True)
        with attention_mode(model, "sea"), pytest.raises(ValueError, match="without its decoding state"):
            model(ids[:1, :1], past_key_values=prefill.past_key_values, use_cache=True)


@pytest.mark.parametrize("budget", [dict(block_keys=48), dict(block_density=0.25)])
def test_block_budget_settings(budget):
    """block_keys may exceed K; block_density keeps about that share of each query block's causal blocks."""
    from sea_convert.attention import select

    cfg = SEAConfig(mode="block", k=16, predictor_length=32, block_size=16, **budget)
    B, Hkv, T = 1, 2, 1024
    est = torch.softmax(torch.randn(B, 2 * Hkv, T, 32), -1)
    from kernels import reference

    sel = select(est, cfg, Hkv, reference)
    nqb = T // 16
    per_block = sel.block_count.float().mean(1)[0]  # mean over heads: budgets are shared by heads
    i = torch.arange(nqb).float()
    if "block_keys" in budget:
        assert torch.equal(per_block[3:], torch.full((nqb - 3,), 3.0))  # ceil(48 / 16) per head
    else:
        expect = torch.ceil(0.25 * (i + 1)).clamp_min(2)  # sink + local are always in
        assert torch.equal(per_block[1:], expect[1:])
    kept, causal = sel.density()
    assert 0 < kept / causal < 0.5  # measured 0.078 (block_keys) and 0.25 (block_density)


def test_cnn_shortcut_equals_upsample_then_project():
    """The CNN projects and normalises at width K/4, then upsamples: the same as the paper's order."""
    import torch.nn.functional as F

    from sea_convert.attention.cnn import CausalCNN

    torch.manual_seed(0)
    cnn = CausalCNN(heads=3, channels_per_head=2, K=32)
    torch.nn.init.normal_(cnn.norm.weight)
    torch.nn.init.normal_(cnn.norm.bias)
    x = torch.randn(2, 6, 40, 8)
    # the paper's order, with the module's own layers (causal: padding on top only)
    h = x + F.relu(cnn.conv1(F.pad(x, (1, 1, 2, 0))))
    h = h + F.relu(cnn.conv2(F.pad(h, (2, 2, 4, 0))))
    paper = cnn.norm(cnn.to_heads(F.interpolate(h, scale_factor=(1, 4), mode="nearest")))
    assert torch.allclose(cnn(x), paper, atol=1e-5)  # measured 9.5e-7 (|x| <= 5.2): 4% of the bound


def test_oracle_mode_full_budget_equals_dense_and_is_causal():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 150))
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
    attach_sea(model, SEAConfig(mode="block", k=16, predictor_length=32, block_size=16, block_keys=256))
    with torch.no_grad(), attention_mode(model, "oracle"), measure_density() as meter:
        full = model(ids, use_cache=False).logits
    assert meter.density == pytest.approx(1.0) and (full - dense).abs().max() < 1e-4  # measured 1.8e-7, as above
    attach_sea(model, SEAConfig(mode="block", k=16, predictor_length=32, block_size=16, block_keys=32))
    other = ids.clone()
    other[0, 100:] = 3
    with torch.no_grad(), attention_mode(model, "oracle"), measure_density() as meter:
        a, b = model(ids, use_cache=False).logits, model(other, use_cache=False).logits
    assert meter.density < 0.6  # measured 0.30
    assert (a[0, :100] - b[0, :100]).abs().max() == 0.0  # exact, as in test_causal


def test_oracle_keeps_the_heaviest_blocks():
    from kernels import reference
    from sea_convert.attention.select import oracle_select

    # one query head whose queries all point at key block 3 (keys 48..63): the oracle must keep it
    T, d, bs = 160, 8, 16
    k = torch.randn(1, 1, T, d) * 0.1
    k[0, 0, 48:64] = torch.ones(d) * 3
    q = torch.ones(1, 1, T, d)
    sel = oracle_select(q, k, 1.0, SEAConfig(mode="block", k=16, predictor_length=32, block_size=bs, block_keys=48))
    last = sel.block_index[0, 0, -1, : sel.block_count[0, 0, -1]].tolist()
    assert 3 in last and 0 in last and (T - 1) // bs in last
    mass = reference.block_attention_mass(q, k, 1.0, bs)
    assert int(mass[0, 0, -1, :-1].argmax()) == 3  # mass 16 against < 1e-9 for every other block


@pytest.mark.parametrize("rows", ["token", "block"])
def test_inference_estimate_carries_the_grouped_probabilities(rows):
    """At inference the predictor hands the selection each KV head's mean probabilities, made beside the softmax;
    they are the mean of exp(log_probs) over the group, and the selection from them is the selection from the
    per-head probabilities. With grad on (training) the estimate carries none."""
    from kernels import reference
    from sea_convert.attention import SEAPredictor, select

    cfg = SEAConfig(mode="block", k=16, predictor_length=32, block_size=16, predictor_rows=rows)
    Hq, Hkv, T, d = 6, 2, 100, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, d, generator=g) for h in (Hq, Hkv, Hkv))
    pred = SEAPredictor(cfg, Hq, Hkv, d, T, 0)
    with torch.no_grad():
        est = pred(q, k, v, d**-0.5, reference)
    want = est.log_probs.exp().view(1, Hkv, Hq // Hkv, *est.log_probs.shape[2:]).mean(2)
    assert est.grouped_probs.shape == want.shape and torch.allclose(est.grouped_probs, want)
    a = select(est.grouped_probs, cfg, Hkv, reference, seq_len=T)
    b = select(est.log_probs.exp(), cfg, Hkv, reference, seq_len=T)
    assert torch.equal(a.block_index, b.block_index) and torch.equal(a.block_count, b.block_count)
    assert pred(q, k, v, d**-0.5, reference).grouped_probs is None


def test_predictor_weights_come_from_the_config_seed_not_the_global_generator():
    """Loading a teacher draws from the global generator by a varying amount (seen: two processes loading SmolLM2
    left it in different states), so the starting predictors must not depend on it: same recipe, same model."""
    from sea_convert.attention import SEAPredictor

    def weights(cfg, layer=3):
        return SEAPredictor(cfg, 4, 2, 16, 256, layer).state_dict()

    cfg = SEAConfig(k=8, predictor_length=16, nbf=2)
    torch.manual_seed(1)
    first = weights(cfg)
    torch.manual_seed(2)
    before = torch.get_rng_state()
    again = weights(cfg)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left as it was
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    other_seed, other_layer = weights(cfg.model_copy(update={"seed": 1})), weights(cfg, layer=4)
    for other in (other_seed, other_layer):
        assert not torch.equal(first["encoder.0.weight"], other["encoder.0.weight"])


@pytest.mark.parametrize("num_features, dim", [(33, 64), (75, 128), (150, 96)])
def test_random_projection_does_not_depend_on_the_thread_count(num_features, dim):
    """LAPACK's QR rounds with the thread count: a Ray Train worker (1 thread) and `sea-convert run` (all cores)
    started from predictors 1e-6 apart and ended 8e-4 apart in perplexity (H100, 2026-12-07). Before the fix this
    failed at every shape here, 1 vs 2 threads, on a 2-core machine."""
    from sea_convert.attention.estimator import orthogonal_random_projection

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = orthogonal_random_projection(num_features, dim, seed=7)
        torch.set_num_threads(4)
        four = orthogonal_random_projection(num_features, dim, seed=7)
        assert torch.get_num_threads() == 4  # the caller's thread count is left as it was
    finally:
        torch.set_num_threads(threads)
    assert one.dtype == torch.float32 and torch.equal(one, four)
    # still Performer's orthogonal features: rows within a block of `dim` are orthogonal
    block = one[: min(num_features, dim)].double()
    gram = block @ block.T
    off_diagonal = gram - torch.diag(gram.diagonal())
    assert off_diagonal.abs().max() < 1e-6 * gram.diagonal().max()  # float32 rounding: measured 1.1e-8 relative


_STARTING_STATE = """
import hashlib, sys, torch
sys.path.insert(0, "tests")
from conftest import tiny_model
from sea_convert.integration import attach_sea
from sea_convert.recipe import SEAConfig
model = tiny_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # head_dim 64, as SmolLM2
attach_sea(model, SEAConfig(mode="block", k=256, predictor_length=256, block_size=32))
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
print("STATE", torch.get_num_threads(), digest.hexdigest())
"""


def test_the_starting_model_is_the_same_at_any_thread_count():
    """A Ray Train worker computes with 1 thread (OMP_NUM_THREADS from its CPU reservation), `sea-convert run` and a
    lone torchrun worker with all the cores. The model and its fresh predictors must not depend on that: the
    estimator's projection (LAPACK's QR) did, and the two paths' GPU runs ended 8.24e-4 apart (H100, 2026-12-07).
    Fresh processes, as the workers are; this failed before the projection's fix."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    states = []
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, "-c", _STARTING_STATE], env=env, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], check=True).stdout
        _, seen_threads, digest = next(x for x in out.splitlines() if x.startswith("STATE")).split()
        assert int(seen_threads) == threads  # the child really computed with that many threads
        states.append(digest)
    assert states[0] == states[1]
