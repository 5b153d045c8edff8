"""SEA attention vs dense FlashAttention on one GPU, in the same run.

For each T: dense causal attention (torch SDPA, flash backend) forward and forward+backward; the
whole SEA layer (estimator + mask construction + block-sparse attention) at a budget of 2,048 keys
per query and at 25% density, forward and forward+backward; the block-sparse kernel alone with its
TFLOP/s on the blocks it computes; peak memory of each. Prints a table; writes JSON.

    python benchmarks/attention_bench.py --lengths 4096 8192 16384 32768 65536 131072 --json $OUT/attention.json

Needs CUDA and the Triton kernels. Imports only torch, triton, pydantic (carried as wheels where
missing) and this project's `kernels` and `sea_convert.attention`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks_timing import graph_ms, median_ms
from kernels import dispatch
from sea_convert.attention import SEAPredictor, sea_attention
from sea_convert.recipe import SEAConfig


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _inputs(T, H, Hkv, d, grad):
    g = torch.Generator(device="cuda").manual_seed(T)
    mk = lambda h: torch.randn(1, h, T, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv)


def dense_row(T, H, Hkv, d, backward: bool) -> dict:
    q, k, v = _inputs(T, H, Hkv, d, backward)
    do = torch.randn_like(q) if backward else None

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        if backward:
            o.backward(do)

    ms = median_ms(run)
    flops = 4 * d * H * T * (T + 1) / 2 * (3.5 if backward else 1.0)
    return {"ms": ms, "tflops": flops / ms / 1e9, "peak_mib": _peak_mib(run)}


def sea_row(T, H, Hkv, d, cfg: SEAConfig, backward: bool, cuda_graph: bool = False) -> dict:
    """Forward: inference (bf16 predictor weights). Forward+backward: training (fp32 weights, bf16 autocast).
    cuda_graph: the forward captured once in a CUDA graph and replayed (the layer makes no host sync)."""
    q, k, v = _inputs(T, H, Hkv, d, backward)
    pred = SEAPredictor(cfg, H, Hkv, d, T, 0).cuda()
    if not backward:
        pred = pred.to(torch.bfloat16)
    if cfg.compile:
        # a static compile per shape, as a fixed-length deployment gets: without the reset, dynamo's
        # recompiles across this loop switch to dynamic-shape kernels and then fall back to eager
        torch._dynamo.reset()
        pred.compile()
    do = torch.randn_like(q) if backward else None
    scale = d ** -0.5

    def run():
        if backward:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                res = sea_attention(q, k, v, pred, cfg, scale)
            res.out.backward(do.float())
            return res
        with torch.no_grad():
            return sea_attention(q, k, v, pred, cfg, scale)

    res = run()
    kept, causal = res.selection.density()
    del res
    if cuda_graph:
        try:
            return {"ms": graph_ms(run), "cuda_graph": True, "density": kept / causal, "kept_entries": kept}
        except RuntimeError as err:  # a host sync inside the layer makes capture fail: report it, keep the run going
            return {"error": f"capture failed: {err}"[:300]}
    ms = median_ms(run)
    return {"ms": ms, "peak_mib": _peak_mib(run), "density": kept / causal, "kept_entries": kept}


def kernel_row(T, H, Hkv, d, cfg: SEAConfig) -> dict:
    """The block-sparse kernel alone, on the lists the SEA layer chose for random inputs."""
    q, k, v = _inputs(T, H, Hkv, d, False)
    pred = SEAPredictor(cfg, H, Hkv, d, T, 0).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        sel = sea_attention(q, k, v, pred, cfg, d ** -0.5).selection
    ops = dispatch.ops("triton", q.device)
    run = lambda: ops.block_sparse_attention(q, k, v, sel.block_index, sel.block_count, sel.block_size, d ** -0.5)  # noqa: E731
    ms = median_ms(run)
    # computed blocks: every listed (query block, key block) pair, full tiles (the diagonal tile too)
    tiles = float(sel.block_count.sum()) * (H // Hkv)
    flops = 4 * d * tiles * sel.block_size**2
    return {"ms": ms, "tflops_on_blocks": flops / ms / 1e9, "peak_mib": _peak_mib(run)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--skip-backward-above", type=int, default=65536, help="fwd+bwd only up to this T")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "attention_bench.json"))
    ap.add_argument("--compile", action="store_true", help="torch.compile the predictor (sea.compile)")
    ap.add_argument("--predictor-rows", nargs="+", default=["token"], choices=["token", "block"],
                    help="predictors to time side by side (block: one row per query block; its K is --block-K)")
    ap.add_argument("--block-K", type=int, default=1024, help="K of the block-row predictor: one key block per bin up"
                    " to K blocks (64k tokens at block 64)")
    ap.add_argument("--no-density-budget", action="store_true", help="only the 2,048-keys budget")
    ap.add_argument("--cuda-graph", action="store_true", help="also time each SEA forward replayed from a CUDA graph")
    a = ap.parse_args()
    budgets = {}
    for rows in a.predictor_rows:
        common = dict(mode="block", k=64, block_size=64, predictor_length=256 if rows == "token" else a.block_K,
                      predictor_rows=rows, backend="triton", compile=a.compile)
        tag = "" if rows == "token" else " block-rows"
        budgets[f"2048 keys{tag}"] = SEAConfig(block_keys=2048, **common)
        if not a.no_density_budget:
            budgets[f"25% density{tag}"] = SEAConfig(block_density=0.25, **common)
    rows = []
    t_start = time.time()
    for Hkv in a.kv_heads:
        for T in a.lengths:
            row = {"T": T, "H": a.heads, "Hkv": Hkv, "d": a.head_dim, "device": torch.cuda.get_device_name()}
            bwd = T <= a.skip_backward_above
            for name, fn in (("dense_fwd", lambda: dense_row(T, a.heads, Hkv, a.head_dim, False)),
                             ("dense_fwdbwd", lambda: dense_row(T, a.heads, Hkv, a.head_dim, True) if bwd else None)):
                try:
                    row[name] = fn()
                except torch.OutOfMemoryError as err:
                    row[name] = {"error": f"OOM: {err}"[:200]}
                torch.cuda.empty_cache()
            for label, cfg in budgets.items():
                cfg = cfg.model_copy(update={"position_table_len": T})
                graphed = (lambda: sea_row(T, a.heads, Hkv, a.head_dim, cfg, False, cuda_graph=True)) if a.cuda_graph else None
                for name, fn in ((f"sea_fwd[{label}]", lambda: sea_row(T, a.heads, Hkv, a.head_dim, cfg, False)),
                                 (f"sea_fwd_graph[{label}]", graphed or (lambda: None)),
                                 (f"sea_fwdbwd[{label}]", lambda: sea_row(T, a.heads, Hkv, a.head_dim, cfg, True) if bwd else None),
                                 (f"kernel[{label}]", lambda: kernel_row(T, a.heads, Hkv, a.head_dim, cfg))):
                    try:
                        row[name] = fn()
                    except torch.OutOfMemoryError as err:
                        row[name] = {"error": f"OOM: {err}"[:200]}
                    torch.cuda.empty_cache()
            rows.append(row)
            with open(a.json, "w") as f:  # written as we go: a timeout still leaves the rows done
                json.dump({"rows": rows, "seconds": time.time() - t_start}, f, indent=1)
            _print_row(row)


def _fmt(x, key="ms"):
    if not x:
        return "-"
    if "error" in x:
        return "OOM" if x["error"].startswith("OOM") else "ERR"
    return f"{x[key]:.2f}"


def _print_row(r: dict) -> None:
    d = r.get("dense_fwd") or {}
    s = r.get("sea_fwd[2048 keys]") or {}
    speed = d.get("ms", math.nan) / s.get("ms", math.nan) if "ms" in d and "ms" in s else math.nan
    b = r.get("sea_fwd[2048 keys block-rows]")
    if b:
        bspeed = d.get("ms", math.nan) / b["ms"] if "ms" in d and "ms" in b else math.nan
        g = r.get("sea_fwd_graph[2048 keys block-rows]")
        gspeed = d.get("ms", math.nan) / g["ms"] if g and "ms" in d and "ms" in g else math.nan
        print(f"T={r['T']:>6} Hkv={r['Hkv']:>2} | block-row predictor: SEA@2048 fwd {_fmt(b)} ms (x{bspeed:.1f}),"
              f" CUDA graph {_fmt(g)} ms (x{gspeed:.1f}), fwd+bwd {_fmt(r.get('sea_fwdbwd[2048 keys block-rows]'))}",
              flush=True)
    print(
        f"T={r['T']:>6} Hkv={r['Hkv']:>2} | dense fwd {_fmt(r.get('dense_fwd'))} ms, fwd+bwd {_fmt(r.get('dense_fwdbwd'))}"
        f" | SEA@2048 fwd {_fmt(s)} ms (x{speed:.1f}), fwd+bwd {_fmt(r.get('sea_fwdbwd[2048 keys]'))}"
        f" | SEA@25% fwd {_fmt(r.get('sea_fwd[25% density]'))}, fwd+bwd {_fmt(r.get('sea_fwdbwd[25% density]'))}"
        f" | kernel@2048 {_fmt(r.get('kernel[2048 keys]'))} ms {_fmt(r.get('kernel[2048 keys]'), 'tflops_on_blocks')} TF/s"
        f" vs dense {_fmt(r.get('dense_fwd'), 'tflops')} TF/s"
        f" | peak MiB dense {_fmt(r.get('dense_fwd'), 'peak_mib')} SEA {_fmt(s, 'peak_mib')}",
        flush=True,
    )


def render_markdown(path: str) -> str:
    """The committed table (docs/benchmarks.md) from a JSON this script wrote."""
    rows = json.load(open(path))["rows"]
    g = lambda r, k, f="ms": (f"{r[k][f]:.2f}" if r.get(k) and f in r[k] else "-")  # noqa: E731
    out = [
        "| Hkv | T | dense fwd ms | dense fwd+bwd ms | SEA@2048 fwd ms | speed-up | SEA@2048 fwd+bwd ms | density@2048 |"
        " SEA@25% fwd ms | SEA@25% fwd+bwd ms | kernel@2048 ms | kernel TF/s | dense TF/s | peak MiB dense / SEA fwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.get("sea_fwd[2048 keys]") or {}
        dn = r.get("dense_fwd") or {}
        speed = f"{dn['ms'] / s['ms']:.2f}x" if "ms" in s and "ms" in dn else "-"
        out.append(
            f"| {r['Hkv']} | {r['T']} | {g(r, 'dense_fwd')} | {g(r, 'dense_fwdbwd')} | {g(r, 'sea_fwd[2048 keys]')} | {speed} |"
            f" {g(r, 'sea_fwdbwd[2048 keys]')} | {g(r, 'sea_fwd[2048 keys]', 'density')} | {g(r, 'sea_fwd[25% density]')} |"
            f" {g(r, 'sea_fwdbwd[25% density]')} | {g(r, 'kernel[2048 keys]')} | {g(r, 'kernel[2048 keys]', 'tflops_on_blocks')} |"
            f" {g(r, 'dense_fwd', 'tflops')} | {g(r, 'dense_fwd', 'peak_mib')} / {g(r, 'sea_fwd[2048 keys]', 'peak_mib')} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render_markdown(sys.argv[2]))
    else:
        main()
