"""The block-row predictor (`sea.predictor_rows: block`): its ops against brute-force definitions at odd
shapes, and the layer built on them (shapes, padding, causality at block boundaries)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import perturb_predictors
from kernels import dispatch, reference
from kernels.reference_block_rows import block_linear_attention, block_scores_from_bins, block_teacher_target, opening_means
from sea_convert.attention import SEAPredictor, sea_attention
from sea_convert.recipe import SEAConfig

OPS = dispatch.ops("torch", torch.device("cpu"))


def _features(*shape):
    return torch.rand(*shape, dtype=torch.float64) + 0.05  # positive, as the estimator's are


@pytest.mark.parametrize("T, H, Hk, bs, chunk", [(37, 4, 4, 8, 8), (64, 6, 2, 16, 3), (50, 8, 2, 7, 2), (33, 3, 1, 32, 1),
                                                 (93, 4, 1, 4, 5)])
def test_block_linear_attention_is_token_linear_attention_at_first_rows(T, H, Hk, bs, chunk):
    """One chunk, several chunks, a last chunk that is partial (chunk_blocks not dividing the blocks)."""
    torch.manual_seed(T)
    nb = math.ceil(T / bs)
    qb, kf, v = _features(1, H, nb, 5), _features(1, Hk, T, 5), torch.randn(1, Hk, T, 6, dtype=torch.float64)
    got = block_linear_attention(qb, kf, v, bs, chunk_blocks=chunk)
    for i in range(nb):  # token linear attention with block i's query at its first row
        first = i * bs
        q_rows = _features(1, H, T, 5)
        q_rows[:, :, first] = qb[:, :, i]
        want = reference.causal_linear_attention(q_rows, kf, v, chunk=8)[:, :, first]
        # computed in fp32 by both (the reference casts its fp64 inputs): measured 1.2e-7, bound 1e-5
        assert torch.allclose(got[:, :, i].double(), want.double(), atol=1e-5), (i, (got[:, :, i] - want).abs().max())


@pytest.mark.parametrize("T, bs", [(37, 8), (64, 16), (50, 7), (5, 32), (1, 4)])
def test_opening_means_are_the_bs_rows_up_to_each_first_row(T, bs):
    x = torch.randn(2, 3, T, 5)
    got = opening_means(x, bs)
    assert got.shape == (2, 3, math.ceil(T / bs), 5)
    for i in range(got.shape[2]):
        first = i * bs
        want = x[:, :, max(0, first - bs + 1) : first + 1].mean(2)
        assert torch.allclose(got[:, :, i], want, atol=1e-6), i  # measured 2.4e-7: fp32 sums in another order


def test_block_rows_read_nothing_after_a_blocks_first_row():
    """Changing every row after block i's first leaves rows 0..i of the estimate as they were: the right
    pads of a batch never enter, and a longer prefix never changes an earlier block's row."""
    cfg, pred, q, k, v = _layer(T=45, bs=8)
    with torch.no_grad():
        before = pred(q, k, v, 0.25, OPS)
        for i, first in enumerate(range(0, 45, 8)):
            q2, k2, v2 = (torch.cat([x[:, :, : first + 1], torch.randn_like(x[:, :, first + 1 :])], 2) for x in (q, k, v))
            after = pred(q2, k2, v2, 0.25, OPS)
            # measured 0: the same sums of the same rows
            assert torch.allclose(before.log_probs[:, :, : i + 1], after.log_probs[:, :, : i + 1], atol=1e-6), i
            assert torch.allclose(before.gates[:, :, : i + 1], after.gates[:, :, : i + 1], atol=1e-6), i
            if i + 1 < before.log_probs.shape[2]:  # and the next block's row does change: the test can fail
                assert not torch.allclose(before.log_probs[:, :, i + 1], after.log_probs[:, :, i + 1], atol=1e-3)


def _brute_block_target(q, k, scale, K, bs):
    B, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    kk = k.repeat_interleave(G, 1)
    s = (q @ kk.transpose(-1, -2)).double() * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    nb = math.ceil(T / bs)
    out = torch.zeros(B, Hq, nb, K, dtype=torch.float64)
    for i in range(nb):
        rows = range(i * bs, min(T, (i + 1) * bs))
        for j in range(i + 1):
            mass = sum(p[:, :, r, j * bs : (j + 1) * bs].sum(-1) for r in rows) / len(rows)
            out[:, :, i, int(j * K // (i + 1))] += mass  # key block j's bin in row i (key_bins' rule)
    return out


@pytest.mark.parametrize("T, Hq, Hk, bs, K, chunk", [(45, 4, 2, 8, 16, 16), (45, 4, 2, 8, 4, 24), (70, 3, 1, 16, 8, 32),
                                                    (31, 2, 2, 32, 8, 64)])
def test_block_teacher_target_matches_brute_force(T, Hq, Hk, bs, K, chunk):
    """K above and below the number of key blocks (one block per bin; several per bin past the cap)."""
    torch.manual_seed(T + K)
    q, k = torch.randn(1, Hq, T, 8), torch.randn(1, Hk, T, 8)
    got = block_teacher_target(q, k, 8 ** -0.5, K, bs, query_chunk=chunk)
    want = _brute_block_target(q, k, 8 ** -0.5, K, bs)
    assert torch.allclose(got.double(), want, atol=1e-5), (got - want).abs().max()  # measured 1.0e-7: fp32 vs fp64 sums
    assert torch.allclose(got.sum(-1), torch.ones(()), atol=1e-5)


def test_block_scores_from_bins():
    nb, K = 12, 8
    probs = torch.rand(1, 2, nb, K)
    probs = probs.masked_fill(_empty(nb, K), 0.0)  # the predictor's empty bins hold nothing
    probs = probs / probs.sum(-1, keepdim=True)
    scores = block_scores_from_bins(probs, nb)
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros(()))
    assert torch.allclose(finite.sum(-1), torch.ones(()), atol=1e-5)  # each row's mass kept, spread over its blocks
    assert torch.isinf(scores[0, 0, 3, 4:]).all() and torch.isfinite(scores[0, 0, 3, :4]).all()
    for i in range(K):  # below the cap each key block is its own bin
        for j in range(i + 1):
            assert scores[0, 1, i, j] == probs[0, 1, i, j * K // (i + 1)]
    # past the cap (row 11: 12 blocks over 8 bins) a bin of two blocks gives each half its mass
    bins = reference.key_bins(torch.tensor(11), nb, K)
    width = torch.bincount(bins, minlength=K)
    for j in range(nb):
        assert torch.isclose(scores[0, 0, 11, j], probs[0, 0, 11, bins[j]] / width[bins[j]])


def _empty(nb, K):
    starts = reference.bin_starts(torch.arange(nb), K)
    return starts[:, 1:] == starts[:, :-1]


def _layer(T=70, bs=8, K=16, Hq=4, Hkv=2, d=16, seed=0):
    torch.manual_seed(seed)
    cfg = SEAConfig(mode="block", predictor_rows="block", k=16, block_size=bs, predictor_length=K, position_table_len=128,
                    backend="torch")
    pred = SEAPredictor(cfg, Hq, Hkv, d, 128, 0).eval()
    q, k, v = torch.randn(1, Hq, T, d), torch.randn(1, Hkv, T, d), torch.randn(1, Hkv, T, d)
    return cfg, pred, q, k, v


def test_block_rows_estimate_shape_and_grid():
    cfg, pred, q, k, v = _layer()
    with torch.no_grad():
        est = pred(q, k, v, 0.25, OPS)
    nb = math.ceil(70 / 8)
    assert est.log_probs.shape == (1, 4, nb, 16) and est.block_size == 8
    finite = torch.isfinite(est.log_probs[0, 0]).sum(-1)
    assert finite.tolist() == [min(i + 1, 16) for i in range(nb)]  # row i: its i+1 key blocks, one bin each
    assert est.per_query_gates(70).shape == (1, 4, 70, 2)


def test_block_rows_layer_is_causal():
    """A row's output depends only on rows up to itself: every prefix gives its rows the outputs the whole
    sequence gives them (the block's estimate is made at its first row; its local keys are causal)."""
    cfg, pred, q, k, v = _layer()
    with torch.no_grad():
        whole = sea_attention(q, k, v, pred, cfg, 0.25).out
        for n in (1, 8, 9, 13, 40, 69):
            prefix = sea_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], pred, cfg, 0.25).out
            # measured 0; 1e-5 leaves room for kernels that sum in another order at another length
            assert torch.allclose(whole[:, :, :n], prefix, atol=1e-5), (n, (whole[:, :, :n] - prefix).abs().max())


def test_block_rows_padded_batch_matches_each_sequence():
    cfg, pred, q, k, v = _layer(T=48)
    real = 37
    q2, k2, v2 = (torch.cat([x, x]) for x in (q, k, v))
    valid = torch.arange(48)[None, :] < torch.tensor([48, real])[:, None]
    with torch.no_grad():
        batch = sea_attention(q2, k2, v2, pred, cfg, 0.25, valid=valid).out
        alone = sea_attention(q[:, :, :real], k[:, :, :real], v[:, :, :real], pred, cfg, 0.25).out
    # measured 0 (same rows, same order); 1e-5 leaves room for a batched matmul that sums in another order
    assert torch.allclose(batch[1:, :, :real], alone, atol=1e-5), (batch[1:, :, :real] - alone).abs().max()


def test_predictor_rows_block_needs_block_mode():
    with pytest.raises(ValueError, match="predictor_rows 'block' needs mode 'block'"):
        SEAConfig(mode="per_query", predictor_rows="block")


def test_attention_picture_draws_block_rows(tmp_path):
    from conftest import tiny_model
    from sea_convert.evaluate import attention_picture
    from sea_convert.integration import attach_sea

    model = tiny_model("llama")
    attach_sea(model, SEAConfig(mode="block", predictor_rows="block", k=16, block_size=16, predictor_length=32))
    path = attention_picture(model, torch.randint(0, 128, (100,)), tmp_path / "a.png")
    assert path.stat().st_size > 10_000  # three panels per head drawn (measured 44 kB; an empty figure is ~2 kB)


@pytest.mark.parametrize("Hq, Hkv, prompt", [(4, 2, 9), (3, 1, 8), (4, 4, 13)])
def test_decoding_one_layer_equals_its_full_pass(Hq, Hkv, prompt):
    """Prefill then token by token, one layer: each new row's output equals the last row of sea_attention over
    the prefix (its block's row made when the block opened, its ring of complete block rows, its selection
    and gates). A budget that competes (4 blocks of 4 per head, sink and local among them, over up to
    10 key blocks) and trained-looking weights."""
    from sea_convert.attention import decode

    torch.manual_seed(Hq * 10 + prompt)
    cfg = SEAConfig(mode="block", predictor_rows="block", k=8, predictor_length=16, block_size=4, block_keys=16,
                    nbf=2, position_table_len=64, backend="torch")
    pred = SEAPredictor(cfg, Hq, Hkv, 16, 64, 0).eval()
    perturb_predictors(pred)
    T = 40
    q, k, v = torch.randn(1, Hq, T, 16), torch.randn(1, Hkv, T, 16), torch.randn(1, Hkv, T, 16)
    errors = []
    with torch.no_grad():
        _, state = decode.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], pred, cfg, 0.25, OPS,
                                  torch.tensor([prompt]), torch.tensor([0]))
        for t in range(prompt, T):
            out = decode.step(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], pred, cfg, 0.25, OPS, state)
            full = sea_attention(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], pred, cfg, 0.25).out[:, :, t]
            errors.append((out[:, :, 0] - full).abs().max().item())
    print(f"Hq={Hq} Hkv={Hkv}: {len(errors)} steps, max |error| {max(errors):.1e}")
    # fp32: the decoder sums its running state in another order; measured 7.2e-7 (fp32 rounding).
    # A wrong ring slot, block sum or stale row moves outputs by 1e-2 or more
    assert max(errors) < 1e-5
