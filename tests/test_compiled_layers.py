"""compile_decoder_layers: each decoder layer compiled around its attention gives the eager model's logits, in SEA
and dense modes, and SEA's attention function runs eagerly inside (a graph break, not traced)."""

import torch
from conftest import tiny_model

from sea_convert.compiled_layers import compile_decoder_layers
from sea_convert.integration import attach_sea, attention_mode, decoder_layers
from sea_convert.recipe import SEAConfig


def test_compiled_layers_give_the_eager_logits():
    model = tiny_model("llama")
    attach_sea(model, SEAConfig(mode="block", k=8, block_keys=16, block_size=8, predictor_length=16,
                                predictor_rows="block"))
    ids = torch.randint(0, model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    eager = {}
    for mode in ("sea", "dense"):
        with torch.no_grad(), attention_mode(model, mode):
            eager[mode] = model(input_ids=ids, use_cache=False).logits
    compile_decoder_layers(model)
    assert all("forward" in vars(layer.self_attn) and layer.mlp._compiled_call_impl is not None
               for layer in decoder_layers(model))
    torch._dynamo.utils.counters.clear()
    for mode in ("sea", "dense"):
        with torch.no_grad(), attention_mode(model, mode):
            compiled = model(input_ids=ids, use_cache=False).logits
        # the same ops fused: float32 rounding only (measured 1.8e-7 on logits of max 0.61, both modes)
        assert (compiled - eager[mode]).abs().max() <= 1e-5 * (1 + eager[mode].abs().max())
        assert not torch.equal(eager["sea"], eager["dense"])  # the modes differ, so each comparison means something
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert any("_sea_forward" in reason for reason in breaks), dict(breaks)  # SEA's attention was not traced


def test_norms_and_mlp_only_for_decoding_keep_the_tokens():
    """attention=False (forwards with a KV cache: the attention forward updates it by layer index) compiles the norms
    and MLP only; greedy decoding through them makes the tokens it made before, SEA and dense."""
    from sea_convert.captured import CapturedDecoding

    model = tiny_model("llama")
    attach_sea(model, SEAConfig(mode="block", k=8, block_keys=16, block_size=8, predictor_length=16,
                                predictor_rows="block"))
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    before = {mode: CapturedDecoding(model, mode, graphs=False).generate(ids, 12) for mode in ("sea", "dense")}
    compile_decoder_layers(model, attention=False)
    assert all("forward" not in vars(layer.self_attn) and layer.mlp._compiled_call_impl is not None
               and layer.input_layernorm._compiled_call_impl is not None for layer in decoder_layers(model))
    for mode in ("sea", "dense"):
        assert torch.equal(CapturedDecoding(model, mode, graphs=False).generate(ids, 12), before[mode])
