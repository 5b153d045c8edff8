"""Decoding speed of one attention layer at long contexts (whole-model generation: benchmarks/generate_bench.py).

    python3 benchmarks/decode_bench.py --json $OUT/decode.json [--predictor-rows block]

One attention layer (H=32 query heads, 8 KV heads, d=128, bf16, batch 1) with a KV cache of
   8k / 32k / 128k tokens, one new token:
   - dense: SDPA over the whole cache (PyTorch's flash / memory-efficient decode kernels);
   - SEA: the whole decode step of sea_convert.attention.decode (estimator state update, row
     decoder, CNN row, estimate, block scores, grouped top-k, the block-sparse decode kernel, gates)
     at the GPU recipe's settings scaled to long context: blocks of 64, 2048 keys per head, K = 256.
   Predictor weights in bf16. The state comes from a real SEA prefill of the context. With block rows
   (--predictor-rows block) each context is also run one token shorter: its step falls inside a block
   (no row, no selection), where a context that is a multiple of the block opens one. Each is timed eagerly and as a
   replayed CUDA graph (launch overhead removed: how a serving loop runs it). Before timing, the
   step is checked against the same step on the PyTorch reference ops, and the decode kernel
   against its reference at that context.
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path

import torch
from benchmarks_timing import graph_ms, median_ms

from kernels import dispatch, reference
from sea_convert.attention.decode import prefill, step
from sea_convert.attention.predictor import SEAPredictor
from sea_convert.attention.select import block_budget
from sea_convert.recipe import SEAConfig


def layer_bench(T: int, cfg: SEAConfig, H: int = 32, Hkv: int = 8, d: int = 128) -> dict:
    g = torch.Generator("cuda").manual_seed(T)
    dt = torch.bfloat16
    k = torch.randn(1, Hkv, T + 1, d, device="cuda", dtype=dt, generator=g)
    v = torch.randn(1, Hkv, T + 1, d, device="cuda", dtype=dt, generator=g)
    q_ctx = torch.randn(1, H, T, d, device="cuda", dtype=dt, generator=g)
    q = torch.randn(1, H, 1, d, device="cuda", dtype=dt, generator=g)
    scale = d**-0.5
    pred = SEAPredictor(cfg, H, Hkv, d, T + 64, 0).cuda().to(torch.bfloat16)  # as converted models run
    ops = dispatch.ops("triton", q.device)
    with torch.no_grad():
        _, state0 = prefill(q_ctx, k[:, :, :T], v[:, :, :T], pred, cfg, scale, ops,
                            torch.tensor([T], device="cuda"), torch.tensor([0], device="cuda"))
        del q_ctx
        torch.cuda.empty_cache()
        # the step on the kernels vs on the reference ops, from the same state
        got = step(q, k, v, pred, cfg, scale, ops, copy.deepcopy(state0))
        want = step(q, k, v, pred, cfg, scale, reference, copy.deepcopy(state0))
        step_err = (got - want).abs().max().item()
        # the decode kernel alone at this context: the budget's selection for the new row's query block
        nkb = math.ceil((T + 1) / cfg.block_size)
        per_head = block_budget(cfg).blocks(nkb - 1)
        idx = torch.stack([torch.sort(torch.randperm(nkb - 1, device="cuda", generator=g)[: per_head - 1]).values
                           for _ in range(Hkv)])
        idx = torch.cat([idx, torch.full((Hkv, 1), nkb - 1, device="cuda")], 1)[None].to(torch.int32)
        cnt = torch.full((1, Hkv), per_head, dtype=torch.int32, device="cuda")
        start, length = torch.tensor([0], device="cuda"), torch.tensor([T + 1], device="cuda")
        ko, _ = ops.sparse_decode_attention(q, k, v, idx, cnt, cfg.block_size, scale, start, length)
        ro, _ = reference.sparse_decode_attention(q.float(), k.float(), v.float(), idx, cnt, cfg.block_size, scale, start, length)
        kernel_err = (ko.float() - ro).abs().max().item()

        def dense():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        length0 = state0.length.clone()

        def sea(config=cfg):
            # the step updates the state in place: every run (and graph replay) starts at position T again
            state = copy.copy(state0)
            state.length.copy_(length0)
            return step(q, k, v, pred, config, scale, ops, state)

        cfg_c = cfg.model_copy(update={"compile": True})

        def sea_compiled():
            return sea(cfg_c)

        compiled_err = (sea_compiled() - want).abs().max().item()

        def kernel():
            return ops.sparse_decode_attention(q, k, v, idx, cnt, cfg.block_size, scale, start, length)

        row = {"context": T, "opens_block": T % cfg.block_size == 0, "step_max_abs_err_vs_reference": step_err,
               "kernel_max_abs_err_vs_reference": kernel_err,
               "dense_eager_ms": median_ms(dense, runs=50), "sea_eager_ms": median_ms(sea, runs=50),
               "kernel_eager_ms": median_ms(kernel, runs=50),
               "dense_graph_ms": graph_ms(dense), "sea_graph_ms": graph_ms(sea), "kernel_graph_ms": graph_ms(kernel),
               "sea_compiled_eager_ms": median_ms(sea_compiled, runs=50), "sea_compiled_graph_ms": graph_ms(sea_compiled),
               "compiled_step_max_abs_err_vs_reference": compiled_err}
    row["speedup_graph"] = row["dense_graph_ms"] / row["sea_graph_ms"]
    row["speedup_compiled_graph"] = row["dense_graph_ms"] / row["sea_compiled_graph_ms"]
    us = {key: row[key] * 1e3 for key in row if key.endswith("_ms")}
    print(f"{T:>7} | {us['dense_eager_ms']:7.1f} {us['sea_eager_ms']:8.1f} {us['sea_compiled_eager_ms']:8.1f} | "
          f"{us['dense_graph_ms']:7.1f} {us['sea_graph_ms']:7.1f} {us['sea_compiled_graph_ms']:7.1f} {us['kernel_graph_ms']:7.1f} | "
          f"{row['speedup_graph']:5.2f}x {row['speedup_compiled_graph']:5.2f}x | {step_err:.1e} {compiled_err:.1e} {kernel_err:.1e}",
          flush=True)
    return row


def per_token_over_blocks(layers: list[dict], block_size: int) -> list[dict]:
    """Block rows: generation pays one opening step (row, CNN, selection) and block_size - 1 steps inside the
    block per block_size tokens. The mean step from the pair timed at each context (compiled, graph replay)."""
    by_context = {row["context"]: row for row in layers}
    out = []
    print(f"per token over a block of {block_size} (compiled step, graph): context | opening  inside  mean | dense | speed-up")
    for T, opening in sorted(by_context.items()):
        inside = by_context.get(T - 1)
        if not opening["opens_block"] or inside is None:
            continue
        mean = (opening["sea_compiled_graph_ms"] + (block_size - 1) * inside["sea_compiled_graph_ms"]) / block_size
        dense = (opening["dense_graph_ms"] + inside["dense_graph_ms"]) / 2
        out.append({"context": T, "opening_ms": opening["sea_compiled_graph_ms"],
                    "inside_ms": inside["sea_compiled_graph_ms"], "mean_step_ms": mean, "dense_ms": dense,
                    "speedup": dense / mean})
        print(f"{T:>7} | {opening['sea_compiled_graph_ms'] * 1e3:7.1f} {inside['sea_compiled_graph_ms'] * 1e3:7.1f} "
              f"{mean * 1e3:7.1f} | {dense * 1e3:7.1f} | {dense / mean:5.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "decode.json"))
    ap.add_argument("--predictor-rows", default="token", choices=["token", "block"])
    ap.add_argument("--K", type=int, default=None, help="predictor_length (default 256 token rows, 1024 block rows)")
    a = ap.parse_args()
    K = a.K or (256 if a.predictor_rows == "token" else 1024)
    cfg = SEAConfig(mode="block", k=64, block_keys=2048, block_size=64, predictor_length=K, backend="triton",
                    predictor_rows=a.predictor_rows)
    print(f"one attention layer, H=32, Hkv=8, d=128, bf16, batch 1; SEA: blocks of {cfg.block_size}, "
          f"{cfg.block_keys} keys per head, K={cfg.predictor_length}, {cfg.predictor_rows} rows")
    print(" context | eager us: dense      SEA  SEA+cmp | graph us: dense     SEA SEA+cmp  kernel | dense/SEA graph, +cmp |"
          " err: step, compiled step, kernel")
    contexts = a.contexts
    if cfg.predictor_rows == "block":  # a step that opens a block (makes its row and selection) and one inside it
        contexts = sorted({c for T in a.contexts for c in (T, T - 1)})
    layers = [layer_bench(T, cfg) for T in contexts]
    per_token = per_token_over_blocks(layers, cfg.block_size) if cfg.predictor_rows == "block" else []
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sea": cfg.model_dump(mode="json"),
            "layer": layers, "block_rows_per_token": per_token}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(info, indent=2))
    print("wrote", a.json)


if __name__ == "__main__":
    main()
