"""kernels.cpu_block_sparse (the CPU's block-sparse attention over the selected blocks only) against the
reference's dense-mask block_sparse_attention, its specification, at shapes that are not block multiples."""

import math

import pytest
import torch

from kernels import cpu_block_sparse as cbs
from kernels import dispatch
from kernels import reference as ref
from kernels.block_budget import BlockBudget

# B, Hq, Hkv, T, d, block_size: T not a multiple of the block, GQA groups of 3, 4 and 1, batch > 1
SHAPES = [(2, 6, 2, 130, 16, 32), (1, 9, 3, 77, 64, 16), (3, 4, 4, 33, 8, 8), (2, 8, 2, 200, 32, 64)]
ALL = 10**6  # blocks per head: every causal block


def _qkv(B, Hq, Hkv, T, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, T, d, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))


def _lists(B, Hkv, T, bs, per_head, seed=1):
    nb = math.ceil(T / bs)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, Hkv, nb, nb, generator=g).masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
    return ref.select_key_blocks(scores, BlockBudget(per_head=per_head, sink_blocks=1, local_blocks=1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_head", [1, 2, ALL])
def test_matches_reference_fp32(shape, per_head):
    B, Hq, Hkv, T, d, bs = shape
    q, k, v = _qkv(B, Hq, Hkv, T, d)
    index, count = _lists(B, Hkv, T, bs, per_head)
    want, want_lse = ref.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    got, got_lse = cbs.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    assert got.dtype == q.dtype and got.shape == want.shape and got_lse.shape == want_lse.shape
    # measured 9.5e-7 on out (|out| <= 3.2) and 4.8e-7 on lse (|lse| <= 6.3), except when this is the process's
    # first such reduction: then the reference itself gives out 5.4e-5, lse 5.0e-5 away from its own second call
    # (the same inputs, in 2 of 30 fresh processes, from the softmax's exp/sum on CPU), hence 1e-4
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert torch.allclose(got_lse, want_lse, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_all_blocks_is_dense_causal_attention(shape):
    B, Hq, Hkv, T, d, bs = shape
    q, k, v = _qkv(B, Hq, Hkv, T, d, seed=5)
    index, count = _lists(B, Hkv, T, bs, ALL)
    assert (count == torch.arange(math.ceil(T / bs)) + 1).all()  # every causal block listed
    got, _ = cbs.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    dense = ref.dense_causal_attention(q, k, v, d ** -0.5)
    assert torch.allclose(got, dense, atol=1e-5, rtol=0)  # measured 6.6e-7


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("per_head", [2, ALL])
def test_matches_reference_bf16(shape, per_head):
    """Both compute in fp32 from the same bf16 inputs and round the output to bf16: at most one bf16 step apart."""
    B, Hq, Hkv, T, d, bs = shape
    q, k, v = _qkv(B, Hq, Hkv, T, d, dtype=torch.bfloat16, seed=2)
    index, count = _lists(B, Hkv, T, bs, per_head)
    want, want_lse = ref.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    got, got_lse = cbs.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    assert got.dtype == torch.bfloat16
    # one bf16 step is at most 2^-7 = 7.8e-3 of the value; measured max 3.9e-3 absolute, 7.3e-3 relative (one step),
    # mean 1.7e-7 (a few entries round apart)
    assert torch.allclose(got.float(), want.float(), atol=1e-5, rtol=2 ** -7)
    assert torch.allclose(got_lse, want_lse, atol=1e-5, rtol=0)  # fp32 from the same inputs: measured 4.8e-7


def test_irregular_lists_empty_future_and_padded():
    """Lists the selector never makes: empty (the row gets 0 and lse -inf), future blocks (fully masked),
    no diagonal, and padding (-1) past the count; the reference's semantics hold for all of them."""
    B, Hq, Hkv, T, d, bs = 2, 6, 3, 70, 16, 16
    nb = math.ceil(T / bs)
    q, k, v = _qkv(B, Hq, Hkv, T, d, seed=7)
    g = torch.Generator().manual_seed(8)
    chosen = torch.rand(B, Hkv, nb, nb, generator=g) < 0.4
    chosen[0, 0, 2] = False  # an empty list
    chosen[1, 2, 1] = False
    chosen[1, 2, 1, 3] = True  # only a future block: no key either
    index, count = ref.blocks_to_index(chosen, maxb=nb + 2)  # wider than needed: -1 past every count
    want, want_lse = ref.block_sparse_attention(q, k, v, index, count, bs, 0.3)
    got, got_lse = cbs.block_sparse_attention(q, k, v, index, count, bs, 0.3)
    assert torch.isinf(want_lse).any()  # the case is exercised
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse)) and (got_lse[torch.isinf(got_lse)] < 0).all()
    assert (got[torch.isinf(got_lse)] == 0).all()
    fin = torch.isfinite(want_lse)
    assert torch.allclose(got_lse[fin], want_lse[fin], atol=1e-5, rtol=0)  # measured 4.8e-7
    assert torch.allclose(got, want, atol=1e-5, rtol=0)  # measured 8.3e-7


def test_gradients_match_reference():
    """Differentiable like the reference, the log-sum-exp included (the CPU's distillation trains through it;
    with gradients the plain path runs, as the fused op's backward ignores the log-sum-exp's gradient)."""
    B, Hq, Hkv, T, d, bs = 2, 6, 2, 75, 16, 16
    index, count = _lists(B, Hkv, T, bs, 2)
    grads = []
    for fn in (ref.block_sparse_attention, cbs.block_sparse_attention):
        q, k, v = (x.requires_grad_() for x in _qkv(B, Hq, Hkv, T, d, seed=3))
        out, lse = fn(q, k, v, index, count, bs, d ** -0.5)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        ((out * w).sum() + lse.sum()).backward()
        grads.append((q.grad, k.grad, v.grad, out.detach()))
    for want, got in zip(*grads):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)  # measured 3.8e-6 (dv), 2.1e-6 (dk), 7.2e-7 (dq) (|grad| <= 9.4)


def test_plain_fallback_matches_reference(monkeypatch):
    """Where torch lacks the fused CPU flash-attention op, the matmul-softmax-matmul path gives the same."""
    monkeypatch.setattr(cbs, "_flash", None)
    B, Hq, Hkv, T, d, bs = SHAPES[0]
    q, k, v = _qkv(B, Hq, Hkv, T, d)
    index, count = _lists(B, Hkv, T, bs, 2)
    want, want_lse = ref.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    got, got_lse = cbs.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)  # measured 6.0e-7
    assert torch.allclose(got_lse, want_lse, atol=1e-5, rtol=0)  # measured 4.8e-7


def test_small_chunks_match(monkeypatch):
    """Chunking over query blocks changes nothing (one query block per chunk here)."""
    monkeypatch.setattr(cbs, "_CHUNK_ELEMENTS", 1)
    B, Hq, Hkv, T, d, bs = SHAPES[1]
    q, k, v = _qkv(B, Hq, Hkv, T, d)
    index, count = _lists(B, Hkv, T, bs, 2)
    want, _ = ref.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    got, _ = cbs.block_sparse_attention(q, k, v, index, count, bs, d ** -0.5)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)  # measured 7.2e-7


def test_dispatch_uses_it_on_the_cpu(monkeypatch):
    monkeypatch.delenv("SEA_CONVERT_CPU_ATTENTION", raising=False)
    for backend in ("auto", "torch"):
        ops = dispatch.ops(backend, torch.device("cpu"))
        assert ops.block_sparse_attention is cbs.block_sparse_attention
        for name in dispatch.OP_NAMES:  # every other op is the reference's, but the gated one built on the CPU's
            if name not in ("block_sparse_attention", "block_sparse_attention_gated"):
                assert getattr(ops, name) is getattr(ref, name), name
        q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
        budget = BlockBudget(per_head=2, sink_blocks=1, local_blocks=1)
        index, count = ref.select_key_blocks(torch.rand(1, 2, 4, 4).tril().log(), budget)
        gates = torch.randn(1, 4, 4, 2)
        got = ops.block_sparse_attention_gated(q, k, v, index, count, 16, 0.3, gates)
        want = ref.block_sparse_attention_gated(q, k, v, index, count, 16, 0.3, gates)
        assert torch.allclose(got, want, atol=1e-5)  # the same op over the CPU's attention: measured ~3e-7
    monkeypatch.setenv("SEA_CONVERT_CPU_ATTENTION", "reference")  # the old path, for comparisons
    assert dispatch.ops("auto", torch.device("cpu")) is ref
