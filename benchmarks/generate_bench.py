"""Whole-model generation, SEA against dense in the same run: SmolLM2-135M (real weights) and a LLaMA-13B-shaped
stack, generate() after long prompts.

    python3 benchmarks/generate_bench.py --model smollm2 --gguf /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --contexts 8192 32768 --batch 1 4 --new-tokens 128 --json $OUT/generate_smollm2.json
    python3 benchmarks/generate_bench.py --model llama13b --layers 4 --contexts 32768 131072 --batch 1 --json $OUT/generate_13b.json
    python3 benchmarks/generate_bench.py --model tiny --device cpu --contexts 200 --batch 1 2 --new-tokens 8   (the script's own check)

Greedy generate() with a static KV cache for both (the cache a compiled or captured step needs):
- dense: SDPA, with transformers' own compile of the decoding forward for a static cache on CUDA (its fast path);
- dense, eager: the same without that compile, for reference;
- SEA: block rows (bench_models.sea_block_rows), the decode step compiled (`sea.compile`; with a static cache it
  traces to two graphs for the whole generation, docs/decoding.md), transformers' whole-forward compile off.
Decode tokens/s = batch x new tokens / (time of prompt + new tokens - time of the prompt alone). Prints a table
and writes JSON. Tokens are compared between SEA's static and growing caches on the first context.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from bench_models import add_model_arguments, build_model, sea_block_rows, write_rows  # noqa: E402
from sea_convert.integration import attach_sea, attention_mode, predictors  # noqa: E402

SETTINGS = (("dense", "dense (SDPA), transformers' compile", True), ("dense", "dense (SDPA), eager", False),
            ("sea", "SEA block rows, compiled step", False))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate(model, mode: str, ids: torch.Tensor, new: int, hf_compile: bool, static: bool = True):
    model.generation_config.disable_compile = not hf_compile
    with torch.no_grad(), attention_mode(model, mode):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, cache_implementation="static" if static else None)


def timed(model, mode: str, ids: torch.Tensor, new: int, hf_compile: bool) -> tuple[float, torch.Tensor]:
    generate(model, mode, ids, new, hf_compile)  # warm-up: compiles what is compiled
    _sync(ids.device)
    start = time.perf_counter()
    out = generate(model, mode, ids, new, hf_compile)
    _sync(ids.device)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "generate.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    longest = max(a.contexts) + a.new_tokens + 1
    model, described = build_model(a.model, device, longest, a.gguf, a.layers)
    cfg = sea_block_rows(device, longest, a.block_K)
    attach_sea(model, cfg)
    for p in predictors(model):
        p.to(torch.bfloat16)
    model.generation_config.eos_token_id = None  # every generation runs its full length
    model.generation_config.pad_token_id = 0
    settings = [s for s in SETTINGS if device.type == "cuda" or not s[2]]  # transformers compiles on CUDA only
    gen = torch.Generator(device=device).manual_seed(0)
    rows, same_tokens = [], None
    print(f"{described}; SEA block rows K={cfg.predictor_length}, {cfg.block_keys} keys/query; {a.new_tokens} new tokens")
    print(" context batch | " + " | ".join(label for _, label, _ in settings) + "   (decode tok/s; prefill ms)")
    for ctx in a.contexts:
        for B in a.batch:
            ids = torch.randint(1, model.config.vocab_size, (B, ctx), device=device, generator=gen)
            entry = {"context": ctx, "batch": B, "new_tokens": a.new_tokens, "settings": {}}
            for mode, label, hf_compile in settings:
                try:
                    t_prompt, _ = timed(model, mode, ids, 1, hf_compile)
                    t_all, out = timed(model, mode, ids, a.new_tokens + 1, hf_compile)
                    row = {"prefill_ms": t_prompt * 1e3, "total_ms": t_all * 1e3}
                    if t_all > t_prompt:  # else the new tokens took less than the timing's noise (tiny CPU runs)
                        row["decode_tokens_per_s"] = B * a.new_tokens / (t_all - t_prompt)
                        row["ms_per_step"] = 1e3 * (t_all - t_prompt) / a.new_tokens
                    entry["settings"][label] = row
                    if mode == "sea" and same_tokens is None:  # static vs growing cache: the same greedy tokens
                        growing = generate(model, "sea", ids, a.new_tokens + 1, False, static=False)
                        same_tokens = bool(torch.equal(out, growing))
                except torch.OutOfMemoryError:
                    entry["settings"][label] = {"error": "out of memory"}
                    torch.cuda.empty_cache()
                except Exception as err:  # noqa: BLE001  (one failed setting is reported; the others still run)
                    entry["settings"][label] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            got = entry["settings"]
            sea = got.get(SETTINGS[2][1], {}).get("decode_tokens_per_s")
            dense = [v["decode_tokens_per_s"] for k, v in got.items() if k != SETTINGS[2][1] and "decode_tokens_per_s" in v]
            if sea and dense:
                entry["sea_vs_fastest_dense"] = sea / max(dense)
            rows.append(entry)
            cells = [v["error"] if "error" in v else f"{v.get('decode_tokens_per_s', float('nan')):9.1f}; {v['prefill_ms']:8.1f}"
                     for v in got.values()]
            ratio = f"  SEA / fastest dense {entry['sea_vs_fastest_dense']:.2f}x" if "sea_vs_fastest_dense" in entry else ""
            print(f"{ctx:>8} {B:>5} | " + " | ".join(cells) + ratio, flush=True)
            write_rows(a.json, device, described, cfg, rows, sea_static_equals_growing_tokens=same_tokens)
    print(f"SEA's greedy tokens, static vs growing cache: {'identical' if same_tokens else 'DIFFERENT'}")
    print("wrote", a.json)


if __name__ == "__main__":
    main()
