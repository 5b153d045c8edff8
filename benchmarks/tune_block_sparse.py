"""Launch settings of the block-sparse forward (the gated kernel the block-row layer runs), timed side by side.

    python3 benchmarks/tune_block_sparse.py --lengths 32768 131072 --json $OUT/tune_block_sparse.json
    python3 benchmarks/tune_block_sparse.py --lengths 32768 --heads 40 --kv-heads 40 --model-layout --max-rows 64

B=1, 32 query heads on 8 KV heads by default (--heads/--kv-heads: 40 on 40 for LLaMA-13B), d=128, bf16, blocks of 64, 2,048 keys per query (the benchmarks' budget: 32
blocks per KV head, sink and local blocks among them, the rest drawn at random), the gates in the epilogue and a
bf16 output, as `sea_attention` runs it at inference. Each setting of `kernels.block_sparse_attention`'s
forward launch (key blocks per step KPS, the stacked-row cap, warps, pipeline stages) is checked against the
default's output, then timed; a setting that does not compile (shared memory) is reported. Prints a table
sorted by time and writes JSON. The default (FORWARD_LAUNCH, _meta) is the first row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
from benchmarks_timing import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from kernels import block_sparse_attention as bsa  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.block_budget import BlockBudget  # noqa: E402


def inputs(T: int, H: int = 32, Hkv: int = 8, d: int = 128, bs: int = 64, keys: int = 2048, model_layout: bool = False):
    """model_layout: q, k, v as a transformers model hands them over, (B, H, T, d) views of (B, T, H, d) memory."""
    g = torch.Generator(device="cuda").manual_seed(T)
    if model_layout:
        q, k, v = (torch.randn(1, T, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for h in (H, Hkv, Hkv))
    else:
        q, k, v = (torch.randn(1, h, T, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H, Hkv, Hkv))
    nb = T // bs
    scores = torch.rand(1, Hkv, nb, nb, device="cuda", generator=g)
    scores = scores.masked_fill(~torch.ones(nb, nb, dtype=torch.bool, device="cuda").tril(), float("-inf"))
    ops = dispatch.ops("triton", q.device)
    bi, bc = ops.select_key_blocks(scores, BlockBudget(per_head=keys // bs, sink_blocks=1, local_blocks=1))
    gates = torch.randn(1, H, nb, 2, device="cuda", generator=g)
    return (q, k, v, bi.to(torch.int32), bc.to(torch.int32), bs, d**-0.5, gates), float(bc.sum()) * (H // Hkv)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--kps", type=int, nargs="+", default=[1, 2], help="key blocks per step")
    ap.add_argument("--max-rows", type=int, nargs="+", default=[64, 128, 256], help="stacked-row caps")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--k-rows", type=int, nargs="+", default=[0, 1], help="K_ROWS: key tiles loaded as rows, then transposed")
    ap.add_argument("--list-in-regs", type=int, nargs="+", default=[0, 1], help="LIST_IN_REGS: the block list read up front")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128, help="d (SmolLM2: 64)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--model-layout", action="store_true", help="q, k, v as views of (B, T, H, d), as a model gives them")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "tune_block_sparse.json"))
    ap.add_argument("--backward", action="store_true", help="time the backward's dk/dv launch settings instead")
    a = ap.parse_args()
    if a.backward:
        return tune_backward(a)
    grid = [dict(KPS=kps, max_rows=rows, num_warps=warps, num_stages=stages, K_ROWS=k_rows, LIST_IN_REGS=held)
            for kps, rows, warps, stages, k_rows, held
            in itertools.product(a.kps, a.max_rows, a.warps, a.stages, a.k_rows, a.list_in_regs)]
    results = []
    layout = "views of (B, T, H, d)" if a.model_layout else "contiguous (B, H, T, d)"
    print(f"{torch.cuda.get_device_name()}: gated block-sparse forward, bf16 out; {a.heads} heads on {a.kv_heads} KV heads, d {a.head_dim},"
          f" q/k/v {layout}")
    for T in a.lengths:
        args, tiles = inputs(T, a.heads, a.kv_heads, a.head_dim, model_layout=a.model_layout)
        want, _ = bsa._forward(*args, out_dtype=torch.bfloat16)
        flops = 4 * a.head_dim * tiles * 64**2
        rows = []
        for launch in [None, *grid]:
            label = "default" if launch is None else " ".join(f"{k}={v}" for k, v in launch.items())
            try:
                got, _ = bsa._forward(*args, out_dtype=torch.bfloat16, launch=launch)
                err = (got.float() - want.float()).abs().max().item()
                ms = median_ms(lambda launch=launch: bsa._forward(*args, out_dtype=torch.bfloat16, launch=launch))
                rows.append({"T": T, "launch": label, "ms": ms, "tflops": flops / ms / 1e9, "max_abs_diff": err})
            except Exception as exc:  # noqa: BLE001  (a setting that does not compile is a row, not a crash)
                rows.append({"T": T, "launch": label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
            print("   ", json.dumps(rows[-1]), flush=True)  # as it goes: a call cut short keeps what it timed
        # the same lists without the gates, bf16 out: what the gates cost on top; and the gates the other way
        # (in the attention's epilogue, or a pass of their own: GATES_IN_EPILOGUE)
        plain = median_ms(lambda: bsa._forward(*args[:7]))
        rows.append({"T": T, "launch": "default, no gates", "ms": plain, "tflops": flops / plain / 1e9, "max_abs_diff": 0.0})
        other = not bsa.GATES_IN_EPILOGUE
        got, _ = bsa._forward(*args, out_dtype=torch.bfloat16, gates_in_epilogue=other)
        ms = median_ms(lambda: bsa._forward(*args, out_dtype=torch.bfloat16, gates_in_epilogue=other))
        rows.append({"T": T, "launch": f"default, gates_in_epilogue={other}", "ms": ms, "tflops": flops / ms / 1e9,
                     "max_abs_diff": (got.float() - want.float()).abs().max().item()})
        print("   ", json.dumps(rows[-2]), "\n   ", json.dumps(rows[-1]), flush=True)
        timed = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        default = next(r for r in rows if r["launch"] == "default")
        print(f"T={T}: default {default.get('ms', float('nan')):.3f} ms")
        for r in timed[:8]:
            print(f"  {r['launch']:45s} {r['ms']:7.3f} ms {r['tflops']:6.0f} TFLOP/s  diff {r['max_abs_diff']:.1e}")
        for r in rows:
            if "error" in r:
                print(f"  {r['launch']:45s} {r['error']}")
        results.extend(rows)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                                        "layout": layout, "rows": results}, indent=1))
    print("wrote", a.json)


def tune_backward(a) -> None:
    """The backward (dk/dv and dq kernels, bf16) for each dk/dv launch: its row cap, warps and stages."""
    results = []
    print(f"{torch.cuda.get_device_name()}: block-sparse backward, bf16")
    for T in a.lengths:
        args, tiles = inputs(T)
        q, k, v, bi, bc, bs, scale, _ = args
        out, lse = bsa._forward(q, k, v, bi, bc, bs, scale)
        do = torch.randn_like(q)
        want = bsa._backward(do, q, k, v, out, lse, bi, bc, bs, scale)
        flops = 2.5 * 4 * 128 * tiles * 64**2  # dq, dk, dv: 5 of the forward's 2 products
        for rows, warps, stages in itertools.product(a.max_rows, a.warps, a.stages):
            launch = dict(max_rows=rows, num_warps=warps, num_stages=stages)
            label = " ".join(f"{k}={v}" for k, v in launch.items())
            try:
                got = bsa._backward(do, q, k, v, out, lse, bi, bc, bs, scale, dkdv_launch=launch)
                diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(got, want))
                ms = median_ms(lambda launch=launch: bsa._backward(do, q, k, v, out, lse, bi, bc, bs, scale, dkdv_launch=launch))
                results.append({"T": T, "dkdv_launch": label, "ms": ms, "tflops": flops / ms / 1e9, "max_abs_diff": diff})
            except Exception as exc:  # noqa: BLE001
                results.append({"T": T, "dkdv_launch": label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
            print("   ", json.dumps(results[-1]), flush=True)
        default = median_ms(lambda: bsa._backward(do, q, k, v, out, lse, bi, bc, bs, scale))
        results.append({"T": T, "dkdv_launch": "default", "ms": default, "tflops": flops / default / 1e9})
        print(f"T={T}: default {default:.3f} ms")
        for r in sorted((r for r in results if r["T"] == T and "ms" in r), key=lambda r: r["ms"])[:8]:
            print(f"  {r['dkdv_launch']:45s} {r['ms']:7.3f} ms {r['tflops']:6.0f} TFLOP/s")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results}, indent=1))
    print("wrote", a.json)


if __name__ == "__main__":
    main()
