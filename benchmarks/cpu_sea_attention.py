"""One SEA attention layer on the CPU: dense causal SDPA vs the reference's block-sparse attention
(dense scores, then masked) vs kernels.cpu_block_sparse (only the selected key blocks); then the whole
SEA layer as a converted model runs it (the per-row predictor, selection, attention and output gates),
and the predictor alone; and the same layer with the block-row predictor (`sea.predictor_rows: block`).

The layer is shaped like SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64) with the recipe's SEA
settings (recipes/smollm2-135m.yaml: block_size 32, k 128 -> 4 key blocks per head, 1 sink, 1 local).
The block lists come from `select_key_blocks` over random block scores (the same counts as a real
predictor's; which blocks are picked does not change the cost). The whole-layer columns use a predictor
with random weights (K=256, output gates on): its cost does not depend on what it learned. Forward only,
no grad, fp32.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cpu_sea_attention.py [--T 1024 2048 4096] [--runs 5] [--threads 1 2]

On cores shared with other work, 2 threads make every parallel op wait for a thread to be scheduled:
the sparse paths (tens of ops) suffer far more than one SDPA call. The JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import cpu_block_sparse, dispatch, reference  # noqa: E402
from kernels.block_budget import BlockBudget  # noqa: E402
from sea_convert.attention import SEAPredictor, sea_attention  # noqa: E402
from sea_convert.recipe import SEAConfig  # noqa: E402


def _median_ms(fn, runs: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch thread counts to measure at (each T at each count)")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=128, help="keys per head per query (blocks per head = k / block_size, rounded up)")
    ap.add_argument("--sink-blocks", type=int, default=1)
    ap.add_argument("--local-blocks", type=int, default=1)
    ap.add_argument("--predictor-length", type=int, default=256, help="K, the estimate's width (whole-layer columns)")
    ap.add_argument("--skip-reference-above", type=int, default=1 << 30, help="leave the slow reference out past this T")
    ap.add_argument("--json", default=str(ROOT / "docs/results/cpu_sea_attention.json"))
    a = ap.parse_args()

    torch.manual_seed(0)
    Hq, Hkv, d, bs = a.heads, a.kv_heads, a.head_dim, a.block_size
    budget = BlockBudget.from_keys(a.k, bs, sink_blocks=a.sink_blocks, local_blocks=a.local_blocks)
    per_head = budget.per_head
    scale = d ** -0.5
    rows = []
    load0 = os.getloadavg()[0]  # other work on the cores slows the sparse paths' many small parallel ops most
    print(f"torch {torch.__version__}, threads {a.threads}, load average {load0:.2f}; Hq={Hq} Hkv={Hkv} d={d} bs={bs}"
          f" blocks/head={per_head} sink={a.sink_blocks} local={a.local_blocks}; median of {a.runs} runs (ms)")
    print(f"{'thr':>3} {'T':>6} {'dense':>9} {'reference':>10} {'new':>9} {'new/dense':>10} {'ref/new':>8} {'kept%':>6}"
          f" {'predictor':>9} {'SEA layer':>9} {'layer/dense':>11} {'block rows':>10} {'b.r./dense':>10}")
    for threads, T in [(th, T) for th in a.threads for T in a.T]:
        torch.set_num_threads(threads)
        q = torch.randn(1, Hq, T, d)
        k = torch.randn(1, Hkv, T, d)
        v = torch.randn(1, Hkv, T, d)
        nb = math.ceil(T / bs)
        scores = torch.rand(1, Hkv, nb, nb).masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
        index, count = reference.select_key_blocks(scores, budget)
        kept = float(count.sum()) * bs * bs / (Hkv * T * (T + 1) / 2)  # kept (query, key) pairs, block-rounded, / causal pairs
        with torch.no_grad():
            dense, dense_t = _median_ms(lambda: reference.dense_causal_attention(q, k, v, scale), a.runs)
            new, new_t = _median_ms(lambda: cpu_block_sparse.block_sparse_attention(q, k, v, index, count, bs, scale), a.runs)
            if T <= a.skip_reference_above:
                ref, ref_t = _median_ms(lambda: reference.block_sparse_attention(q, k, v, index, count, bs, scale), a.runs)
            else:
                ref, ref_t = None, []
            err = (cpu_block_sparse.block_sparse_attention(q, k, v, index, count, bs, scale)[0]
                   - reference.block_sparse_attention(q, k, v, index, count, bs, scale)[0]).abs().max().item()
            cfg = SEAConfig(mode="block", k=a.k, block_size=bs, predictor_length=a.predictor_length,
                            sink_blocks=a.sink_blocks, local_blocks=a.local_blocks, position_table_len=T)
            predictor = SEAPredictor(cfg, Hq, Hkv, d, T, 0).eval()
            ops = dispatch.ops("auto", q.device)
            pred, pred_t = _median_ms(lambda: predictor(q, k, v, scale, ops), a.runs)
            layer, layer_t = _median_ms(lambda: sea_attention(q, k, v, predictor, cfg, scale), a.runs)
            # the block-row predictor (issue 20): one row per query block, bins over key blocks
            bcfg = cfg.model_copy(update={"predictor_rows": "block"})
            bpred = SEAPredictor(bcfg, Hq, Hkv, d, T, 0).eval()
            blayer, blayer_t = _median_ms(lambda: sea_attention(q, k, v, bpred, bcfg, scale), a.runs)
        row = {"threads": threads, "T": T, "dense_ms": dense, "reference_ms": ref, "new_ms": new, "new_over_dense": new / dense,
               "reference_over_new": None if ref is None else ref / new, "kept_fraction": kept,
               "max_blocks_listed": int(index.shape[-1]), "max_abs_diff_vs_reference": err,
               "predictor_ms": pred, "sea_layer_ms": layer, "sea_layer_over_dense": layer / dense,
               "block_rows_layer_ms": blayer, "block_rows_layer_over_dense": blayer / dense,
               "runs_ms": {"dense": dense_t, "reference": ref_t, "new": new_t, "predictor": pred_t, "sea_layer": layer_t,
                           "block_rows_layer": blayer_t}}
        rows.append(row)
        ref_s = "-" if ref is None else f"{ref:10.1f}"
        rn = "-" if ref is None else f"{ref / new:8.1f}"
        print(f"{threads:>3} {T:>6} {dense:9.1f} {ref_s:>10} {new:9.1f} {new / dense:10.2f} {rn:>8} {100 * kept:6.1f}"
              f" {pred:9.1f} {layer:9.1f} {layer / dense:11.2f} {blayer:10.1f} {blayer / dense:10.2f}")
    out = {
        "what": "one SEA attention layer, forward, fp32, CPU: dense causal SDPA vs reference block_sparse_attention"
                " (dense masked scores) vs kernels.cpu_block_sparse (selected blocks only); the whole SEA layer"
                " (per-row predictor, K=predictor_length, + selection + attention + gates) and the predictor alone",
        "shape": {"B": 1, "Hq": Hq, "Hkv": Hkv, "head_dim": d, "block_size": bs, "blocks_per_head": per_head,
                  "sink_blocks": a.sink_blocks, "local_blocks": a.local_blocks, "predictor_length": a.predictor_length},
        "runs": a.runs, "statistic": "median ms after one warm-up",
        "torch": torch.__version__, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_before_after": [load0, os.getloadavg()[0]],
        "rows": rows,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
