"""Does torch.compile speed up the SEA predictor (fusing its elementwise and norm chains)? Forward, bf16.

    python3 benchmarks/compile_probe.py --lengths 32768 131072
"""

from __future__ import annotations

import argparse
import time

import torch
from benchmarks_timing import median_ms

from kernels import dispatch
from sea_convert.attention import SEAPredictor
from sea_convert.recipe import SEAConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    a = ap.parse_args()
    H, Hkv, d = 32, 8, 128
    for T in a.lengths:
        cfg = SEAConfig(mode="block", k=64, block_keys=2048, block_size=64, backend="triton", position_table_len=T)
        pred = SEAPredictor(cfg, H, Hkv, d, T, 0).cuda().to(torch.bfloat16)
        q = torch.randn(1, H, T, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, T, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ops = dispatch.ops("triton", q.device)
        eager = lambda: pred(q, k, v, d ** -0.5, ops)  # noqa: E731
        compiled_pred = torch.compile(pred)
        comp = lambda: compiled_pred(q, k, v, d ** -0.5, ops)  # noqa: E731
        with torch.no_grad():
            e_ms = median_ms(eager)
            t0 = time.time()
            ref = eager().log_probs
            got = comp().log_probs
            torch.cuda.synchronize()
            compile_s = time.time() - t0
            c_ms = median_ms(comp)
            err = (got - ref).abs().nan_to_num(0).max().item()
        print(f"T={T}: predictor eager {e_ms:.2f} ms, compiled {c_ms:.2f} ms (x{e_ms / c_ms:.2f}),"
              f" compile {compile_s:.0f} s, max |log-prob diff| {err:.3e}", flush=True)


if __name__ == "__main__":
    main()
