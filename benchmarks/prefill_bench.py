"""Whole-model prefill: SmolLM2-135M at 8k tokens, SEA vs SDPA, on one GPU.

    python3 benchmarks/prefill_bench.py --gguf /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf --json $OUT/prefill.json

The predictors are freshly initialised (timing does not depend on training); bf16 weights, no grad,
use_cache=False for both. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from benchmarks_timing import median_ms

from sea_convert.integration import attach_sea, attention_mode, compile_predictors, predictors
from sea_convert.models import load_teacher
from sea_convert.recipe import ModelSource, SEAConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "prefill.json"))
    a = ap.parse_args()
    model, _ = load_teacher(ModelSource(path=a.gguf.parent, gguf_file=a.gguf.name, dtype="bfloat16"), "cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, a.tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    rows = []

    def bench(mode: str, label: str) -> None:
        def run():
            with torch.no_grad(), attention_mode(model, mode):
                return model(input_ids=ids, use_cache=False).logits

        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated() / 2**20
        ms = median_ms(run)
        rows.append({"setting": label, "ms": ms, "tokens_per_s": a.tokens / ms * 1e3, "peak_mib": peak})
        print(f"{label:34s} {ms:9.2f} ms {a.tokens / ms * 1e3:11.0f} tok/s  peak {peak:8.0f} MiB", flush=True)

    bench("dense", "SDPA (dense)")
    for label, cfg in (
        ("SEA block, 2048 keys/query", SEAConfig(mode="block", k=64, block_keys=2048, block_size=64, backend="triton")),
        ("SEA block, 25% density", SEAConfig(mode="block", k=64, block_density=0.25, block_size=64, backend="triton")),
    ):
        attach_sea(model, cfg)
        for p in predictors(model):
            p.to(torch.bfloat16)
        bench("sea", label)
        compile_predictors(model)
        bench("sea", label + " + compile")
    info = {"device": torch.cuda.get_device_name(), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, bf16)",
            "tokens": a.tokens, "rows": rows}
    with open(a.json, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
