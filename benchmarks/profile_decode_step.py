"""Where one SEA decode step spends its GPU time (torch.profiler), eager ops and compiled.

    python3 benchmarks/profile_decode_step.py --context 32768 [--compile]

Prints the kernels by total CUDA time over 20 steps, and how many launches one step makes.
"""

from __future__ import annotations

import argparse
import copy

import torch

from kernels import dispatch
from sea_convert.attention.decode import prefill, step
from sea_convert.attention.predictor import SEAPredictor
from sea_convert.recipe import SEAConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    T, H, Hkv, d = a.context, 32, 8, 128
    cfg = SEAConfig(mode="block", k=64, block_keys=2048, block_size=64, predictor_length=256, backend="triton",
                    compile=a.compile)
    g = torch.Generator("cuda").manual_seed(0)
    k = torch.randn(1, Hkv, T + 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    q = torch.randn(1, H, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    pred = SEAPredictor(cfg, H, Hkv, d, T + 64, 0).cuda().to(torch.bfloat16)
    ops = dispatch.ops("triton", q.device)
    with torch.no_grad():
        _, state0 = prefill(torch.randn(1, H, T, d, device="cuda", dtype=torch.bfloat16, generator=g), k[:, :, :T],
                            v[:, :, :T], pred, cfg, d**-0.5, ops, torch.tensor([T], device="cuda"),
                            torch.tensor([0], device="cuda"))
        length0 = state0.length.clone()

        def one():
            state = copy.copy(state0)
            state.length.copy_(length0)
            return step(q, k, v, pred, cfg, d**-0.5, ops, state)

        for _ in range(5):
            one()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                one()
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in events) / 20
    total = sum(e.self_device_time_total for e in events) / 20
    print(f"context {T}, compile={a.compile}: {launches:.0f} kernel launches per step, {total:.1f} us of GPU time per step")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"{e.self_device_time_total / 20:8.1f} us  x{e.count / 20:4.1f}  {e.key[:110]}")


if __name__ == "__main__":
    main()
