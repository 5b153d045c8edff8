"""The models the whole-model benchmarks build, and the SEA setting they time (prefill_bench, generate_bench).

SmolLM2-135M comes from its GGUF (real weights). Shaped models (a LLaMA-13B-shaped stack, a tiny one for the
scripts' CPU checks) are built on the meta device and given random bf16 weights, as the distributed code builds
one (`workers/train/sharded_load.py`): no 13B weights can be had here, and speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sea_convert.recipe import SEAConfig

LLAMA_13B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
             "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
# SmolLM2-135M's config (read from its GGUF): the shape without the weights, for a device call that cannot carry
# the GGUF (two halves, two calls); its speed is the real model's (no step depends on the weights' values)
SMOLLM2_SHAPE = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                 "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                 "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The options both whole-model benchmarks take: which model (build_model), batches, the SEA setting's K, device."""
    ap.add_argument("--model", choices=["smollm2", "smollm2-shaped", "llama13b", "tiny"], default="smollm2")
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (for --model smollm2)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of a shaped model (llama13b: 4)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--block-K", type=int, default=1024, help="K of the block-row predictor")
    ap.add_argument("--device", default="cuda")


def build_model(kind: str, device: torch.device, longest: int, gguf: Path | None = None, layers: int | None = None):
    """(model in bf16 on `device`, its description). kind: smollm2 | smollm2-shaped | llama13b | tiny; longest: the longest
    sequence the benchmark runs (a shaped model's position range is raised to it)."""
    if kind == "smollm2":
        from sea_convert.models import load_teacher
        from sea_convert.recipe import ModelSource

        if gguf is None:
            raise SystemExit("--gguf: the SmolLM2 GGUF file is needed for --model smollm2")
        model, _ = load_teacher(ModelSource(path=gguf.parent, gguf_file=gguf.name, dtype="bfloat16"), str(device))
        return model, "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, bf16)"
    from transformers import AutoConfig

    from workers.train.sharded_load import build_skeleton, init_random_weights, materialize

    fields = dict({"llama13b": LLAMA_13B, "smollm2-shaped": SMOLLM2_SHAPE}.get(kind, TINY))
    if layers:
        fields["num_hidden_layers"] = layers
    fields["max_position_embeddings"] = max(fields["max_position_embeddings"], longest)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = build_skeleton(config, torch.bfloat16)
    materialize(model, device)
    init_random_weights(model, seed=0)
    return model, f"{kind.removesuffix('-shaped')}-shaped: {config.num_hidden_layers} layers x {config.hidden_size}, random bf16 weights"


def sea_block_rows(device: torch.device, table_len: int, K: int = 1024) -> SEAConfig:
    """The setting the benchmarks time: block rows (K bins of key blocks), 2,048 keys per query, blocks of 64,
    the position table sized to the benchmark's longest sequence, compiled on CUDA."""
    cuda = device.type == "cuda"
    return SEAConfig(mode="block", k=64, block_keys=2048, block_size=64, predictor_length=K, predictor_rows="block",
                     position_table_len=table_len, backend="triton" if cuda else "auto", compile=cuda)


def device_name(device: torch.device) -> str:
    """The GPU a benchmark's figures ran on (every figure names its GPU kind), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_rows(path: str | Path, device: torch.device, described: str, cfg: SEAConfig, rows: list, **extra) -> None:
    """A whole-model benchmark's JSON (device, model, SEA setting, rows), written again after each row so that a
    later length's failure keeps the rows already timed."""
    info = {"device": device_name(device),
            "torch": torch.__version__, "model": described, "sea": cfg.model_dump(mode="json"), **extra, "rows": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(info, indent=1))
