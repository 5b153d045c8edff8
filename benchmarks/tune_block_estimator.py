"""The block-row estimator's settings, timed side by side (`kernels.block_estimator._forward`).

    python3 benchmarks/tune_block_estimator.py --lengths 32768 131072 --json $OUT/tune_block_estimator.json

B=1, 32 query heads, 8 KV heads, d=128, bf16 keys and values, blocks of 64, 77 random features: the shapes of
the layer benchmarks. For each output dtype (fp32: the accurate path; bf16: the fast path a bf16 predictor
takes) and each launch setting (value columns per program, rows per segment, warps), the estimate is checked
against the fp64 reference at 8k (max |error| / (1 + |out|)) and timed; the features kernel's own settings (key
blocks a program, pipeline stages) are timed alone. Then the default's
kernels, one by one (torch profiler), and the position table's gradient (closed form against autograd through
the reference). Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch
from benchmarks_timing import median_ms
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from kernels import block_estimator as be  # noqa: E402
from kernels import reference_block_rows as ref  # noqa: E402


def inputs(T: int, H: int = 32, Hkv: int = 8, d: int = 128, bs: int = 64):
    g = torch.Generator(device="cuda").manual_seed(T)
    m = int(d * math.log(d) / 8)
    k, v = (torch.randn(1, Hkv, T, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    qf = torch.rand(1, H, T // bs, m, device="cuda", generator=g)
    table = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)
    proj = torch.randn(m, d, device="cuda", generator=g)
    return qf, k, v, table, proj, d**-0.5, bs


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs() / (1 + want.abs())).max().item()


def kernel_times(fn) -> dict:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: round(e.device_time_total / 1e3, 4) for e in prof.key_averages() if e.device_time_total > 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--value-tiles", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--segment-rows", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--warps", type=int, nargs="+", default=[4])
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "tune_block_estimator.json"))
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}: block-row estimator, 32 query heads, 8 KV heads, d 128, blocks of 64")
    # accuracy at 8k (the fp64 reference of 128k would take minutes): each path against the exact estimate
    qf, k, v, table, proj, scale, bs = inputs(8192)
    want = ref.block_rows_estimate(qf.double(), k.double(), v.double(), table.double(), proj.double(), scale, bs)
    accuracy = {str(dt): error(be._forward(qf, k, v, table, proj, scale, bs, out_dtype=dt), want)
                for dt in (torch.float32, torch.bfloat16)}
    accuracy["bf16 rounding of the exact output"] = error(want.to(torch.bfloat16), want)
    print("8k accuracy, max |error| / (1 + |out|):", json.dumps(accuracy))
    results = {"device": torch.cuda.get_device_name(), "accuracy_8k": accuracy, "rows": [], "kernels": {}, "grad": []}
    grid = list(itertools.product((torch.float32, torch.bfloat16), a.value_tiles, a.segment_rows, a.warps))
    for T in a.lengths:
        args = inputs(T)
        rows = []
        for dt in (torch.float32, torch.bfloat16):
            label = f"{str(dt)[6:]} default"
            ms = median_ms(lambda dt=dt: be._forward(*args, out_dtype=dt))
            rows.append({"T": T, "setting": label, "ms": ms})
            results["kernels"][f"{T} {label}"] = kernel_times(lambda dt=dt: be._forward(*args, out_dtype=dt))
        for dt, tile, seg, warps in grid:
            label = f"{str(dt)[6:]} tile={tile} seg={seg} warps={warps}"
            run = lambda dt=dt, tile=tile, seg=seg, warps=warps: be._forward(  # noqa: E731
                *args, value_tile=tile, segment_rows=seg, out_dtype=dt, warps=warps)
            try:
                diff = (run().double() - be._forward(*args, out_dtype=dt).double()).abs().max().item()
                rows.append({"T": T, "setting": label, "ms": median_ms(run), "max_abs_diff_vs_default": diff})
            except Exception as exc:  # noqa: BLE001  (a setting that does not compile is a row, not a crash)
                rows.append({"T": T, "setting": label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
            print("   ", json.dumps(rows[-1]), flush=True)  # as it goes: a call cut short keeps what it timed
        for blocks, stages in itertools.product((1, 2, 4), (1, 2, 3)):  # the features kernel, fast path (bf16 keys)
            label = f"bfloat16 features: {blocks} blocks a program, {stages} stages"
            run = lambda blocks=blocks, stages=stages: be._forward(  # noqa: E731
                *args, out_dtype=torch.bfloat16, feature_blocks=blocks, feature_stages=stages)
            try:
                ms = kernel_times(run).get("_key_features", float("nan"))
                rows.append({"T": T, "setting": label, "features_ms": ms})
            except Exception as exc:  # noqa: BLE001
                rows.append({"T": T, "setting": label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
            print("   ", json.dumps(rows[-1]), flush=True)
        print(f"T={T}:")
        for r in sorted((r for r in rows if "features_ms" in r), key=lambda r: r["features_ms"])[:4]:
            print(f"  {r['setting']:40s} {r['features_ms']:7.3f} ms (features kernel alone)")
        for r in sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])[:10]:
            print(f"  {r['setting']:40s} {r['ms']:7.3f} ms")
        for key in (f"{T} float32 default", f"{T} bfloat16 default"):
            top = sorted(results["kernels"][key].items(), key=lambda kv: -kv[1])[:6]
            print(f"  kernels, {key}: " + ", ".join(f"{name[:24]} {ms:.3f}" for name, ms in top))
        # the position table's gradient (training): closed form, against autograd through the reference
        qf, k, v, table, proj, scale, bs = args
        table32 = table.float().requires_grad_(True)
        go = torch.randn(1, 32, T // bs, 256, device="cuda")
        grad = {"T": T, "closed_form_ms": median_ms(lambda: be.position_table_grad(qf, k, table32, proj, scale, bs, go))}
        if T <= 32768:  # the reference's autograd holds (B, Hkv, T, 2d) values and chunk states: 128k would not fit well
            def through_reference():
                with torch.enable_grad():
                    out = ref.block_rows_estimate(qf, k, v, table32, proj, scale, bs)
                    return torch.autograd.grad(out, table32, go)[0]
            grad["reference_autograd_ms"] = median_ms(through_reference, runs=3)
            got = be.position_table_grad(qf, k, table32, proj, scale, bs, go)
            exact = through_reference()
            grad["max_rel_diff"] = ((got - exact).abs().max() / exact.abs().max()).item()
        print(f"  position table grad: {json.dumps(grad)}")
        results["grad"].append(grad)
        results["rows"].extend(rows)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))
    print("wrote", a.json)


if __name__ == "__main__":
    main()
