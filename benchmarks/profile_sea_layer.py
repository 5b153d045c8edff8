"""Profile one SEA layer forward on the GPU: which ops cost what (torch profiler, CUDA time).

    python benchmarks/profile_sea_layer.py --T 32768 --kv-heads 8
    python benchmarks/profile_sea_layer.py --T 32768 --predictor-rows block --compile --backward

--backward profiles the training step instead (fp32 predictor weights under bf16 autocast, the layer's output
backward to q, k, v and the predictor, as attention_bench.py's fwd+bwd), with no stage table.
"""

from __future__ import annotations

import argparse
import functools

import torch
from benchmarks_timing import median_ms
from torch.profiler import ProfilerActivity, profile, record_function

from kernels import block_estimator
from kernels.reference_predictor import positive_features
from sea_convert.attention import SEAPredictor, sea_attention
from sea_convert.recipe import SEAConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="torch.compile the predictor and the gates mix")
    ap.add_argument("--predictor-rows", default="token", choices=["token", "block"])
    ap.add_argument("--K", type=int, default=None, help="predictor_length (default 256 token rows, 1024 block rows)")
    ap.add_argument("--backward", action="store_true", help="profile the training step (forward + backward)")
    a = ap.parse_args()
    d, T = 128, a.T
    K = a.K or (256 if a.predictor_rows == "token" else 1024)
    cfg = SEAConfig(mode="block", k=64, block_keys=2048, block_size=64, predictor_length=K, backend="triton",
                    position_table_len=T, compile=a.compile, predictor_rows=a.predictor_rows)
    q = torch.randn(1, a.heads, T, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, a.kv_heads, T, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if a.backward:
        training_profile(q, k, v, cfg, a)
        return
    pred = SEAPredictor(cfg, a.heads, a.kv_heads, d, T, 0).cuda().to(torch.bfloat16)  # inference weights
    if a.compile:
        pred.compile()

    def run():
        with torch.no_grad():
            return sea_attention(q, k, v, pred, cfg, d ** -0.5)

    from kernels import dispatch
    from sea_convert.attention.layer import _compiled_mix, mix_output
    from sea_convert.attention.select import select

    ops = dispatch.ops("triton", q.device)
    with torch.no_grad():
        est = pred(q, k, v, d ** -0.5, ops)
        probs = est.log_probs.exp()
        sel = select(probs, cfg, a.kv_heads, ops, seq_len=T)
        sparse, _ = sel.attend(q, k, v, d ** -0.5, ops)

    def stage(fn):
        def wrapped():
            with torch.no_grad():
                fn()
        return median_ms(wrapped)

    stages = {
        "estimator (linear attention)": (
            (lambda: pred.estimator(q, k, v, d ** -0.5, ops)) if pred.block_rows is None else
            (lambda: pred.estimator.block_rows(ops.opening_means(q, pred.block_rows), k, v, d ** -0.5, ops, pred.block_rows))),
        "predictor total": lambda: pred(q, k, v, d ** -0.5, ops),
        "exp + select": lambda: select(est.log_probs.exp(), cfg, a.kv_heads, ops, seq_len=T),
        "block-sparse kernel": lambda: sel.attend(q, k, v, d ** -0.5, ops),
        "gates mix": lambda: (_compiled_mix() if a.compile else mix_output)(sparse, est.per_query_gates(T), sel.kept, v),
        "whole layer": run,
    }
    if pred.block_rows is not None:  # the earlier path, for comparison: features and [v, p] in torch, two walks
        est_mod, bs = pred.estimator, pred.block_rows
        qf_open = positive_features(ops.opening_means(q, bs) * d ** -0.25, est_mod.projection.float(), is_query=True)

        def walked():
            kf = positive_features(k.float() * d ** -0.25, est_mod.projection.float(), is_query=False)
            return ops.block_linear_attention(qf_open, kf, est_mod.values(v), bs)

        stages["estimator, earlier path (walks)"] = walked
        for tile in (64, 128):  # value columns per program: the chunked estimator's tuning knob
            stages[f"estimator kernels, value tile {tile}"] = functools.partial(
                block_estimator._forward, qf_open, k, v, est_mod.position_values, est_mod.projection, d ** -0.5, bs,
                value_tile=tile)
    if pred.block_rows is not None:  # what the layer runs at inference: the gates in the kernel's epilogue
        stages["kernel + gates (one kernel)"] = lambda: ops.block_sparse_attention_gated(
            q, k, v, sel.block_index, sel.block_count, sel.block_size, d ** -0.5, est.gates)
    for name, fn in stages.items():
        print(f"{name:32s} {stage(fn):8.2f} ms")
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("sea_layer"):
            run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))


def training_profile(q, k, v, cfg: SEAConfig, a) -> None:
    """The training step: fp32 predictor weights, bf16 autocast, the output's backward (q, k, v and predictor)."""
    d = q.shape[-1]
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    pred = SEAPredictor(cfg, a.heads, a.kv_heads, d, a.T, 0).cuda()
    if a.compile:
        pred.compile()
    do = torch.randn_like(q, dtype=torch.float32)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sea_attention(q, k, v, pred, cfg, d ** -0.5).out
        out.backward(do)

    print(f"{'training step (fwd+bwd)':32s} {median_ms(step):8.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("sea_layer_fwd_bwd"):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
