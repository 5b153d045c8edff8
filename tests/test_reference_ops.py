"""The PyTorch reference ops against naive dense computations, at shapes that are not block multiples."""

import math

import pytest
import torch

from kernels import reference as ref
from kernels.block_budget import BlockBudget

SHAPES = [(1, 4, 2, 77, 16), (2, 6, 3, 130, 32), (1, 2, 2, 33, 8)]  # B, Hq, Hkv, T, d


def _qkv(B, Hq, Hkv, T, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g),
            torch.randn(B, Hkv, T, d, generator=g))


def _dense_probs(q, k, scale):
    G = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), -1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [8, 64])
def test_causal_linear_attention(shape, chunk):
    B, H, _, T, d = shape
    g = torch.Generator().manual_seed(1)
    qf, kf = torch.rand(B, H, T, 5, generator=g), torch.rand(B, H, T, 5, generator=g)
    v = torch.randn(B, H, T, d, generator=g)
    a = (qf @ kf.transpose(-1, -2)).tril()
    naive = (a @ v) / a.sum(-1, keepdim=True)
    got = ref.causal_linear_attention(qf, kf, v, chunk=chunk)
    assert torch.allclose(got, naive, atol=1e-5, rtol=1e-4)  # measured 2.4e-7 (|out| <= 3.3): under 1% of the bound


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("K", [16, 64])
def test_teacher_target_pools_dense_attention(shape, K):
    q, k, _ = _qkv(*shape)
    scale = shape[-1] ** -0.5
    p = _dense_probs(q, k, scale)
    T = shape[3]
    naive = torch.zeros(*p.shape[:3], K)
    for t in range(T):
        for s in range(t + 1):
            naive[:, :, t, (s * K) // (t + 1)] += p[:, :, t, s]
    pooled, lse = ref.teacher_target(q, k, scale, K, query_chunk=29)
    # the loop adds up to 130 probabilities one at a time: relative error <= 130 x 2^-24 = 7.7e-6 at worst, inside rtol.
    # Measured 2.4e-7 in bins near 1, 3.4e-8 in bins below 0.05 (4% of the bound); a key in the wrong bin moves ~1/t
    assert torch.allclose(pooled, naive, atol=1e-6, rtol=1e-5)
    G = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-5)  # measured 4.8e-7 (|lse| <= 6): 1% of the bound


def _masked_dense(q, k, v, keep, scale):
    """keep: (B, Hkv, T, T) bool."""
    G = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale
    T = q.shape[2]
    allowed = keep.repeat_interleave(G, 1) & torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return p @ v.repeat_interleave(G, 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("per_head", [1, 2, 100])
def test_block_sparse_attention(shape, bs, per_head):
    q, k, v = _qkv(*shape)
    B, Hq, Hkv, T, d = shape
    nb = math.ceil(T / bs)
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(B, Hkv, nb, nb, generator=g).masked_fill(
        torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
    index, count = ref.select_key_blocks(scores, BlockBudget(per_head=per_head, sink_blocks=1, local_blocks=1))
    keep_blocks = torch.zeros(B, Hkv, nb, nb, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for i in range(nb):
                ids = index[b, h, i, : count[b, h, i]].long()
                assert (ids >= 0).all() and (ids <= i).all()
                assert torch.equal(ids, ids.unique(sorted=True))  # sorted, no duplicates
                assert 0 in ids.tolist() and i in ids.tolist()  # sink and local always in
                keep_blocks[b, h, i, ids] = True
    keep = keep_blocks.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :T, :T]
    out, lse = ref.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    # measured 6.0e-7 (|out| <= 3): 3% of the bound (atol + the default rtol 1e-5)
    assert torch.allclose(out, _masked_dense(q, k, v, keep, d ** -0.5), atol=1e-5)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k_budget", [2, 8])
def test_per_query_sparse_attention(shape, k_budget):
    q, k, v = _qkv(*shape)
    B, Hq, Hkv, T, d = shape
    K = 16
    g = torch.Generator().manual_seed(4)
    est = torch.softmax(torch.randn(B, Hkv, T, K, generator=g), -1)
    bin_mask = ref.select_bins_per_query(est, k_budget)
    keep = torch.zeros(B, Hkv, T, T, dtype=torch.bool)
    for t in range(T):
        for s in range(t + 1):
            keep[:, :, t, s] = bin_mask[:, :, t, (s * K) // (t + 1)]
    assert keep[:, :, torch.arange(T), torch.arange(T)].all()  # each head keeps its own key
    out, _ = ref.per_query_sparse_attention(q, k, v, bin_mask, d ** -0.5, query_chunk=31)
    assert torch.allclose(out, _masked_dense(q, k, v, keep, d ** -0.5), atol=1e-5)  # measured 7.2e-7: 2% of the bound


def test_per_query_budget_follows_the_paper():
    """Row t keeps about Hkv * k * K / (t+1) bins (k keys per head); short rows are dense."""
    B, Hkv, T, K, k = 1, 2, 400, 32, 16  # rows shorter than k * K = 512: a bin is narrower than k keys
    est = torch.softmax(torch.randn(B, Hkv, T, K), -1)
    mask = ref.select_bins_per_query(est, k)
    starts = ref.bin_starts(torch.arange(T), K)
    widths = starts[:, 1:] - starts[:, :-1]
    kept_keys = (mask * widths).sum(-1).sum(1).float()  # over heads
    t = torch.arange(T)
    short = t + 1 <= k
    assert torch.equal(kept_keys[0, short], (Hkv * (t[short] + 1)).float())  # dense
    long_rows = t >= 200
    per_head = kept_keys[0, long_rows] / Hkv
    assert per_head.mean() == pytest.approx(k, rel=0.35)  # measured 17.6-17.7 for k=16 (budget rounds up to whole bins)


def test_pooled_block_scores_keep_mass():
    B, H, T, K, bs = 2, 3, 150, 32, 16
    est = torch.softmax(torch.randn(B, H, T, K), -1)
    scores = ref.pool_key_block_scores(est, bs)
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    assert torch.allclose(finite.sum(-1), torch.ones(B, H, scores.shape[2]), atol=1e-5)  # measured |sum - 1| <= 6e-8
    assert torch.isinf(scores[..., 0, 1:]).all()  # above the diagonal: not causal


def test_causal_linear_attention_gqa_reads_the_kv_head():
    g = torch.Generator().manual_seed(2)
    qf = torch.rand(1, 6, 50, 5, generator=g)
    kf, v = torch.rand(1, 2, 50, 5, generator=g), torch.randn(1, 2, 50, 7, generator=g)
    expanded = ref.causal_linear_attention(qf, kf.repeat_interleave(3, 1), v.repeat_interleave(3, 1), chunk=16)
    # measured 0 (default tolerances): the GQA path does the expanded one's arithmetic on the shared KV head
    assert torch.allclose(ref.causal_linear_attention(qf, kf, v, chunk=16), expanded)


@pytest.mark.parametrize("shape", SHAPES)
def test_block_attention_mass_pools_dense_attention(shape):
    q, k, _ = _qkv(*shape)
    B, Hq, Hkv, T, d = shape
    bs = 16
    p = _dense_probs(q, k, d ** -0.5)  # (B, Hq, T, T)
    nb = math.ceil(T / bs)
    naive = torch.zeros(B, Hkv, nb, nb)
    G = Hq // Hkv
    for t in range(T):
        for s in range(t + 1):
            naive[:, :, t // bs, s // bs] += p[:, :, t, s].view(B, Hkv, G).sum(-1)
    got = ref.block_attention_mass(q, k, d ** -0.5, bs, query_chunk=32)
    finite = torch.isfinite(got)
    # measured 1.1e-5 at block masses up to 32 (the default rtol 1e-5 applies): 6% of the bound
    assert torch.allclose(got[finite], naive[finite], atol=1e-5)
    assert not finite[..., 0, 1:].any()  # above the diagonal
