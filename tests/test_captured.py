"""sea_convert.captured on the CPU: what runs without a GPU (the graphs themselves: tests/test_gpu_integration.py)."""

import pytest
import torch
from conftest import tiny_model

from sea_convert.captured import CapturedDecoding, CapturedPrefill
from sea_convert.integration import attach_sea, attention_mode
from sea_convert.recipe import SEAConfig


def _block_rows_model():
    model = tiny_model("llama")
    attach_sea(model, SEAConfig(mode="block", k=8, block_keys=16, block_size=8, predictor_length=16,
                                predictor_rows="block"))
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("mode", ["sea", "dense"])
def test_decoding_loop_makes_the_tokens_of_generate(mode):
    """The decoding loop (each step the model's forward on the token buffer, positions from the static cache's own
    counter) makes the greedy tokens of transformers' generate() with a static cache; 20 steps over blocks of 8."""
    model = _block_rows_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    ours = CapturedDecoding(model, mode, graphs=False).generate(ids, 20)
    with torch.no_grad(), attention_mode(model, mode):
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                                   do_sample=False, cache_implementation="static")
    assert ours.shape == (2, 57) and torch.equal(ours, reference)


def test_graphs_need_a_gpu():
    model = _block_rows_model()
    with pytest.raises(ValueError, match="CUDA device"):
        CapturedDecoding(model, "sea")
    with pytest.raises(ValueError, match="CUDA device"):
        CapturedPrefill(model, 1, 16)


def test_a_generation_stops_at_its_length():
    model = _block_rows_model()
    decoding = CapturedDecoding(model, "sea", graphs=False)
    made = decoding.start(torch.zeros(1, 9, dtype=torch.long), 2)
    made.append(decoding.step())
    assert len(made) == 2
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoding.step()


def test_sea_models_leave_generates_whole_forward_uncompiled():
    """attach_sea turns off generate()'s automatic reduce-overhead compile of the whole forward (static caches on a
    GPU), which splits its CUDA graphs at SEA's attention and fails there (H100); dense generation may turn it on."""
    model = tiny_model("llama")
    assert not model.generation_config.disable_compile
    attach_sea(model, SEAConfig(mode="block", k=8, block_keys=16, block_size=8))
    assert model.generation_config.disable_compile
