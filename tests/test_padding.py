"""Right-padded batches: every real position's output equals that of its sequence run alone."""

import pytest
import torch

from conftest import tiny_model
from kernels import reference
from sea_convert.attention import SEAPredictor, measure_density, sea_attention, select
from sea_convert.integration import attach_sea, attention_mode, capture_attention, predictors
from sea_convert.recipe import SEAConfig

LENGTHS = (203, 150, 37, 97)  # none a multiple of the block size 16: every last block is partial; 203 is unpadded
CASES = [("dense", "block"), ("sea", "block"), ("sea", "per_query"), ("oracle", "block")]


def _right_padded(lengths, seed=0, vocab=128):
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def _sea_model(arch, mode, **cfg):
    model = tiny_model(arch)
    attach_sea(model, SEAConfig(mode=mode, k=16, predictor_length=64, block_size=16, **cfg))
    torch.manual_seed(1)
    for pred in predictors(model):  # trained gates read the estimate: any pad influence would show
        torch.nn.init.normal_(pred.gates.weight, std=0.5)
        torch.nn.init.normal_(pred.gates.bias, std=0.5)
    return model


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("attention,mode", CASES)
def test_right_padded_batch_equals_each_sequence_alone(arch, attention, mode):
    model = _sea_model(arch, mode)
    ids, mask = _right_padded(LENGTHS)
    with torch.no_grad(), attention_mode(model, attention), measure_density() as meter:
        batched = model(ids, attention_mask=mask, use_cache=False).logits
        alone = [model(ids[b : b + 1, :L], use_cache=False).logits[0] for b, L in enumerate(LENGTHS)]
    assert torch.isfinite(batched).all()  # pad positions too: a NaN there would reach real rows' products
    err = max((batched[b, :L] - a).abs().max().item() for b, (L, a) in enumerate(zip(LENGTHS, alone)))
    print(f"{arch}/{attention}/{mode}: right-padded vs alone max |logit error| = {err:.2e}")
    if attention != "dense":
        assert meter.density < 0.7  # really sparse: selection is exercised (measured 0.19 .. 0.25)
    assert err < 1e-5  # measured 1.0e-7 .. 2.1e-7 (fp32 summation order of batched matmuls)


def test_block_selection_leaves_pads_out():
    """Block mode pools a query block's rows: pads sharing a block with the last real rows must not count,
    and that block's bins are read at its last real row. Real query blocks then select exactly as alone."""
    cfg = SEAConfig(mode="block", k=16, predictor_length=32, block_size=16, block_keys=64)  # 4 blocks per head
    B, Hq, Hkv, T, K = len(LENGTHS), 4, 2, max(LENGTHS), 32
    torch.manual_seed(0)
    est = torch.softmax(3 * torch.randn(B, Hq, T, K), -1)
    valid = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    pad_row = torch.nn.functional.one_hot(torch.tensor(K // 2), K).float()  # pads all point at one bin
    est = torch.where(valid[:, None, :, None], est, pad_row)
    padded, ignored = select(est, cfg, Hkv, reference, valid=valid), select(est, cfg, Hkv, reference)
    differs = False
    for b, L in enumerate(LENGTHS):
        alone = select(est[b : b + 1, :, :L], cfg, Hkv, reference)
        nqb = alone.block_index.shape[2]
        for sel in (padded, ignored):
            assert sel.block_index.shape[2] == -(-T // 16)
        idx = padded.block_index[b : b + 1, :, :nqb, : alone.block_index.shape[-1]]
        # exact: the same selection code on the same estimate rows (the estimate is an input here)
        assert torch.equal(idx, alone.block_index) and torch.equal(padded.block_count[b : b + 1, :, :nqb], alone.block_count)
        assert torch.equal(padded.kept[b : b + 1, :, :L], alone.kept)
        differs |= not torch.equal(ignored.block_count[b : b + 1, :, :nqb], alone.block_count) or not torch.equal(
            ignored.block_index[b : b + 1, :, :nqb, : alone.block_index.shape[-1]], alone.block_index
        )
    assert differs  # without `valid` the pads do change some real block's selection


def test_huge_later_keys_cannot_move_earlier_estimates():
    """Pads (or any later tokens) with huge keys leave earlier rows' estimates and outputs exactly as they are:
    the estimator's key stabiliser comes from the first key alone (a max over all keys was not causal)."""
    cfg = SEAConfig(mode="block", k=16, predictor_length=32, block_size=16)
    torch.manual_seed(0)
    pred = SEAPredictor(cfg, 4, 2, 16, 512, 0)
    torch.nn.init.normal_(pred.gates.weight, std=0.5)
    lengths, T = (90, 57), 120
    q, k, v = torch.randn(2, 4, T, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    k = torch.where(valid[:, None, :, None], k, 30 * k)
    with torch.no_grad():
        padded = sea_attention(q, k, v, pred, cfg, 0.25, valid=valid)
        errs, est_errs = [], []
        for b, L in enumerate(lengths):
            alone = sea_attention(q[b : b + 1, :, :L], k[b : b + 1, :, :L], v[b : b + 1, :, :L], pred, cfg, 0.25)
            errs.append((padded.out[b, :, :L] - alone.out[0]).abs().max().item())
            est_errs.append((padded.estimate.log_probs[b, :, :L].exp() - alone.estimate.log_probs[0].exp()).abs().max().item())
    print(f"pad keys x30: max |output error| {max(errs):.2e}, max |estimate error| {max(est_errs):.2e}")
    assert max(errs) < 1e-5  # measured 1.8e-7 (fp32; the padded and alone runs sum in different chunk shapes)
    assert max(est_errs) < 1e-5  # measured 1.5e-7 (probabilities, fp32)


def test_full_mask_is_no_mask_and_a_mask_with_a_hole_is_refused():
    """Padding on one side is supported (left padding: tests/test_decoding.py); a gap inside a sequence is not."""
    model = _sea_model("llama", "block")
    ids, _ = _right_padded((40, 40))
    holed = torch.ones_like(ids)
    holed[0, 10:15] = 0
    with torch.no_grad(), attention_mode(model, "sea"):
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits,
                           model(ids, use_cache=False).logits)
    for attention in ("sea", "oracle"):
        with attention_mode(model, attention), torch.no_grad(), pytest.raises(ValueError, match="padded on one side"):
            model(ids, attention_mask=holed, use_cache=False)


def test_capture_refuses_padding():
    model = _sea_model("llama", "block")
    ids, mask = _right_padded((40, 33))
    with torch.no_grad(), capture_attention(model), pytest.raises(ValueError, match="unpadded"):
        model(ids, attention_mask=mask, use_cache=False)


def test_plain_causal_batch_gets_no_mask_even_while_tracing():
    """Under CUDA-graph capture or torch.compile, SDPA's mask builder materialises the (B, 1, T, T) mask (its
    None shortcut checks is_tracing), and SEA's check of that mask is a host sync that breaks the capture.
    SEA's builder gives None for a plain causal batch in both cases, and the same mask as SDPA's otherwise."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from sea_convert.integration import register_attention_functions

    register_attention_functions()
    sea_mask = ALL_MASK_ATTENTION_FUNCTIONS["sea"]

    def build(builder, x, padding=None):
        return builder(batch_size=x.shape[0], q_length=x.shape[1], kv_length=x.shape[1], attention_mask=padding,
                       device=x.device)

    x = torch.zeros(2, 12)
    traced = torch.compile(build, backend="eager", fullgraph=True)  # dynamo tracing: is_tracing() is True
    assert traced(sea_mask, x) is None
    assert traced(sdpa_mask, x) is not None  # the reason: SDPA's builder materialises the mask while tracing
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, 9:] = False
    assert torch.equal(build(sea_mask, x, padding), build(sdpa_mask, x, padding))
    assert build(sea_mask, x) is None and build(sdpa_mask, x) is None
    assert ALL_MASK_ATTENTION_FUNCTIONS["sea_dense"] is sea_mask  # dense mode captures at FlashAttention's speed


def test_model_numbered_positions_get_no_mask_while_tracing_when_vouched_for():
    """A model numbers its tokens itself and hands those positions to the mask builder, which checks them for packed
    sequences by a read back to the host; while tracing (and while a CUDA graph captures) it skips the read and asks
    for the full mask. Inside known_plain_causal (CapturedPrefill's capture) the answer is known: None."""
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask

    from sea_convert.integration import known_plain_causal, register_attention_functions

    register_attention_functions()
    config = AutoConfig.for_model("llama", hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                  intermediate_size=64, vocab_size=64)
    config._attn_implementation = "sea"

    def build(x, positions):
        return create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, past_key_values=None,
                                  position_ids=positions)

    x, positions = torch.zeros(2, 12, 32), torch.arange(12)[None]
    traced = torch.compile(build, backend="eager", fullgraph=True)
    assert build(x, positions) is None
    assert tuple(traced(x, positions).shape) == (2, 1, 12, 12)  # the reason: the full mask while tracing
    with known_plain_causal():
        assert traced(x, positions) is None
    assert traced(x, positions) is not None  # vouching ends with the block


def test_dense_mode_is_plain_sdpa():
    """attention_mode(model, "dense") runs transformers' SDPA attention (under its own name, for the mask builder):
    the same logits as the model as loaded, padded batches included."""
    model = _sea_model("llama", "block")
    ids, mask = _right_padded((40, 33))
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, use_cache=False).logits
        with attention_mode(model, "dense"):
            assert model.config._attn_implementation == "sea_dense"
            dense = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(dense, plain)


def test_captured_prefill_needs_a_cuda_model():
    """On a CPU model the capture is refused naming the device (the GPU test replays it: test_gpu_integration.py)."""
    from sea_convert.captured import CapturedPrefill

    with pytest.raises(ValueError, match="needs a model on a CUDA device, got cpu"):
        CapturedPrefill(_sea_model("llama", "block"), batch_size=1, seq_len=16)
