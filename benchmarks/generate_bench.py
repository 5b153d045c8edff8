"""Whole-model generation, SEA against dense in the same run: SmolLM2-135M (real weights) and a LLaMA-13B-shaped
stack, greedy decoding after long prompts.

    python3 benchmarks/generate_bench.py --model smollm2 --gguf /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --contexts 8192 32768 --batch 1 4 --new-tokens 128 --json $OUT/generate_smollm2.json
    python3 benchmarks/generate_bench.py --model llama13b --layers 4 --contexts 32768 131072 --batch 1 --json $OUT/generate_13b.json
    python3 benchmarks/generate_bench.py --model tiny --device cpu --contexts 200 --batch 1 2 --new-tokens 8   (the script's own check)

Greedy decoding with a static KV cache, each setting timed on its own:
- dense, transformers' compile: SDPA, generate() with transformers' own compile of the decoding forward for a
  static cache on CUDA (its fast path: CUDA graphs through torch.compile's reduce-overhead mode);
- dense, captured steps / SEA, captured steps: `sea_convert.captured.CapturedDecoding`, every step of the whole
  model replayed from a CUDA graph (on CUDA; eager on the CPU), the same treatment for both attentions;
- SEA, generate(): block rows with the decode step compiled (`sea.compile`), transformers' compile off (the path a
  user of generate() gets).
On CUDA every setting runs with the decoder layers' norms and MLP compiled (`compile_decoder_layers(attention=False)`;
--eager-layers: as loaded). SEA: block rows (bench_models.sea_block_rows). Decode tokens/s: generate(): batch x new tokens / (time of prompt +
new tokens - time of the prompt alone); captured: batch x new tokens / time of new-token steps once every kind of
step is captured (the prompt and the first steps, up to a block of 64 run eagerly, are timed apart). Prints a table
and writes JSON; on the first context, whether SEA's captured tokens equal its eager loop's.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from bench_models import add_model_arguments, build_model, sea_block_rows, write_rows  # noqa: E402
from sea_convert.captured import CapturedDecoding  # noqa: E402
from sea_convert.compiled_layers import compile_decoder_layers  # noqa: E402
from sea_convert.integration import attach_sea, attention_mode, predictors  # noqa: E402

WARM_STEPS = 66  # CapturedDecoding.start: the first token, and eager steps until each kind of step has run (<= 65)


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


def with_generate(model, mode: str, ids: torch.Tensor, new: int, hf_compile: bool) -> dict:
    t_prompt, _ = timed(model, mode, ids, 1, hf_compile)
    t_all, _ = timed(model, mode, ids, new + 1, hf_compile)
    row = {"prefill_ms": t_prompt * 1e3, "total_ms": t_all * 1e3}
    if t_all > t_prompt:  # else the new tokens took less than the timing's noise (tiny CPU runs)
        row["decode_tokens_per_s"] = ids.shape[0] * new / (t_all - t_prompt)
        row["ms_per_step"] = 1e3 * (t_all - t_prompt) / new
    return row


def with_captured_steps(model, mode: str, ids: torch.Tensor, new: int) -> tuple[dict, torch.Tensor]:
    decoding = CapturedDecoding(model, mode, graphs=ids.is_cuda)
    _sync(ids.device)
    t0 = time.perf_counter()
    made = decoding.start(ids, new + WARM_STEPS)
    _sync(ids.device)
    t1 = time.perf_counter()
    for _ in range(new):
        made.append(decoding.step())
    _sync(ids.device)
    t2 = time.perf_counter()
    row = {"start_ms": (t1 - t0) * 1e3, "warm_steps": len(made) - new, "graphs": len(decoding.graphs),
           "decode_tokens_per_s": ids.shape[0] * new / (t2 - t1), "ms_per_step": 1e3 * (t2 - t1) / new}
    return row, torch.cat([ids, *made], dim=1)


SETTINGS = ("dense, transformers' compile", "dense, captured steps", "SEA, captured steps", "SEA, generate()")


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "generate.json"))
    ap.add_argument("--eager-layers", action="store_true", help="leave the decoder layers' norms and MLP uncompiled")
    a = ap.parse_args()
    device = torch.device(a.device)
    longest = max(a.contexts) + a.new_tokens + WARM_STEPS + 1
    model, described = build_model(a.model, device, longest, a.gguf, a.layers)
    cfg = sea_block_rows(device, longest, a.block_K)
    attach_sea(model, cfg)
    for p in predictors(model):
        p.to(torch.bfloat16)
    if device.type == "cuda" and not a.eager_layers:
        # norms and MLP fused, for every setting alike (the attention forward stays eager: it updates the KV cache)
        compile_decoder_layers(model, attention=False)
    model.generation_config.eos_token_id = None  # every generation runs its full length
    model.generation_config.pad_token_id = 0
    cuda = device.type == "cuda"
    settings = [s for s in SETTINGS if cuda or s != SETTINGS[0]]  # transformers compiles on CUDA only
    gen = torch.Generator(device=device).manual_seed(0)
    rows, same_tokens = [], None
    print(f"{described}; SEA block rows K={cfg.predictor_length}, {cfg.block_keys} keys/query; {a.new_tokens} new tokens")
    print(" context batch | " + " | ".join(settings) + "   (decode tok/s; ms/step)")
    for ctx in a.contexts:
        for B in a.batch:
            ids = torch.randint(1, model.config.vocab_size, (B, ctx), device=device, generator=gen)
            entry = {"context": ctx, "batch": B, "new_tokens": a.new_tokens, "settings": {}}
            for label in settings:
                if cuda:  # what the last setting left (its cache, its graphs' pools) is not this one's memory
                    gc.collect()
                    torch.cuda.empty_cache()
                try:
                    if label == SETTINGS[0]:
                        row = with_generate(model, "dense", ids, a.new_tokens, hf_compile=True)
                    elif label == SETTINGS[3]:
                        row = with_generate(model, "sea", ids, a.new_tokens, hf_compile=False)
                    else:
                        mode = "dense" if label == SETTINGS[1] else "sea"
                        row, tokens = with_captured_steps(model, mode, ids, a.new_tokens)
                        if mode == "sea" and same_tokens is None:  # captured vs eager steps: the same greedy tokens
                            eager = CapturedDecoding(model, "sea", graphs=False).generate(ids, a.new_tokens + WARM_STEPS)
                            same_tokens = bool(torch.equal(tokens, eager[:, : tokens.shape[1]]))
                    entry["settings"][label] = row
                except torch.OutOfMemoryError:
                    entry["settings"][label] = {"error": "out of memory"}
                    torch.cuda.empty_cache()
                except Exception as err:  # noqa: BLE001  (one failed setting is reported; the others still run)
                    entry["settings"][label] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            got = entry["settings"]
            sea = got.get(SETTINGS[2], {}).get("decode_tokens_per_s")
            dense = [v["decode_tokens_per_s"] for k, v in got.items() if k.startswith("dense") and "decode_tokens_per_s" in v]
            if sea and dense:
                entry["sea_vs_fastest_dense"] = sea / max(dense)
            rows.append(entry)
            cells = [v["error"] if "error" in v else f"{v.get('decode_tokens_per_s', float('nan')):9.1f}; {v.get('ms_per_step', float('nan')):7.2f}"
                     for v in got.values()]
            ratio = f"  SEA captured / fastest dense {entry['sea_vs_fastest_dense']:.2f}x" if "sea_vs_fastest_dense" in entry else ""
            print(f"{ctx:>8} {B:>5} | " + " | ".join(cells) + ratio, flush=True)
            write_rows(a.json, device, described, cfg, rows, sea_captured_equals_eager_tokens=same_tokens,
                       layers_compiled="norms and MLP" if device.type == "cuda" and not a.eager_layers else "none")
    print(f"SEA's greedy tokens, captured vs eager steps: {'identical' if same_tokens else 'DIFFERENT'}")
    print("wrote", a.json)


if __name__ == "__main__":
    main()
