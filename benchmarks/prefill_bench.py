"""Whole-model prefill, SEA against dense in the same run: SmolLM2-135M (real weights) and a LLaMA-13B-shaped stack.

    python3 benchmarks/prefill_bench.py --model smollm2 --gguf /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tokens 8192 32768 --batch 1 4 --json $OUT/prefill_smollm2.json
    python3 benchmarks/prefill_bench.py --model llama13b --layers 4 --tokens 32768 131072 --batch 1 --json $OUT/prefill_13b.json
    python3 benchmarks/prefill_bench.py --model tiny --device cpu --tokens 256 --batch 1 2   (the script's own check)

Both attentions run the same way: bf16 weights, no grad, no KV cache, the logits of the last position only
(128k x 32000 fp32 logits would be 16 GB), on CUDA every decoder layer compiled around its attention
(`sea_convert.compiled_layers`: norms, rotary embeddings and MLP fused; --eager-layers leaves them as transformers
runs them). Each prefill is timed eagerly and replayed from a CUDA graph
(`sea_convert.captured.CapturedPrefill`: no host launches; SEA runs dozens of small kernels a layer), the replay
checked against the eager logits. Both capture without the (B, 1, T, T) mask transformers would build under capture
(`integration._sea_mask`; dense SDPA given it left FlashAttention: 2x slower at 32k on an H100). The speed-up takes
each attention in its faster form. SEA: block rows (K=1024), 2,048 keys per query, blocks of 64, predictors in bf16
and compiled, the position table sized to the longest prompt by the script (RoPE as the model has it). The
predictors are fresh: speed does not depend on training. The 13B-shaped stack is built on the meta device and
given random weights, as the distributed code builds one (`workers/train/sharded_load.py`). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
from benchmarks_timing import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from kernels import block_sparse_attention as bsa  # noqa: E402
from bench_models import add_model_arguments, build_model, sea_block_rows, write_rows  # noqa: E402
from sea_convert.captured import CapturedPrefill  # noqa: E402
from sea_convert.compiled_layers import compile_decoder_layers  # noqa: E402
from sea_convert.integration import attach_sea, attention_mode, compile_predictors, predictors  # noqa: E402


def time_prefill(model, mode: str, ids: torch.Tensor, graph: bool) -> dict:
    """Eager and (on CUDA) CUDA-graph times of one prefill; a capture that fails is reported, not hidden."""
    def run():
        with torch.no_grad(), attention_mode(model, mode):
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row = {"eager_ms": median_ms(run, runs=5)}
    if cuda:
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if cuda and graph:
        torch.cuda.empty_cache()  # the graph's private pool cannot reuse what the eager runs left cached
        try:
            captured = CapturedPrefill(model, ids.shape[0], ids.shape[1], mode)
            row["graph_ms"] = median_ms(lambda: captured(ids), runs=10, warmup=2)
            row["graph_max_abs_err_vs_eager"] = (captured(ids).float() - run().float()).abs().max().item()
            del captured
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001  (a host sync or dynamic shape inside the model: say which)
            first = err.__context__ or err  # the capture's own error hides the op that failed inside it
            row["graph_error"] = f"{type(first).__name__}: {str(first).splitlines()[0][:300]}"
    return row


def parse_launch(text: str) -> dict:
    """'KPS=2,K_ROWS=1' -> {'KPS': 2, 'K_ROWS': 1}: overrides of the block-sparse forward's FORWARD_LAUNCH ('default':
    none)."""
    if text == "default":
        return {}
    try:
        return {key: int(value) for key, value in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--sea-launch {text!r}: expected 'default' or KEY=INT items, e.g. KPS=2,K_ROWS=1") from None


@contextlib.contextmanager
def forward_launch(overrides: dict):
    """The block-sparse forward's launch settings with `overrides`, for the prefills timed inside
    (GATES_IN_EPILOGUE: the module's switch for the output gates, in the attention's epilogue or a pass of their own)."""
    saved, saved_gates = dict(bsa.FORWARD_LAUNCH), bsa.GATES_IN_EPILOGUE
    overrides = dict(overrides)
    bsa.GATES_IN_EPILOGUE = bool(overrides.pop("GATES_IN_EPILOGUE", saved_gates))
    bsa.FORWARD_LAUNCH.update(overrides)
    try:
        yield
    finally:
        bsa.FORWARD_LAUNCH.clear()
        bsa.FORWARD_LAUNCH.update(saved)
        bsa.GATES_IN_EPILOGUE = saved_gates


def best(row: dict) -> tuple[float, str]:
    """Each attention in its faster form (a capture can lose to eager where the host was never the bottleneck)."""
    forms = [(row[k], k.removesuffix("_ms")) for k in ("graph_ms", "eager_ms") if k in row]
    return min(forms)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--no-graph", action="store_true", help="eager only")
    ap.add_argument("--eager-layers", action="store_true",
                    help="leave the decoder layers and SEA's predictors uncompiled (the model as transformers runs it)")
    ap.add_argument("--profile", action="store_true",
                    help="after the table: the time per kernel of one SEA and one dense prefill at the first length")
    ap.add_argument("--sea-launch", nargs="+", default=["default"], metavar="KEY=INT,...",
                    help="SEA timed once per setting of the block-sparse forward's launch (FORWARD_LAUNCH overrides,"
                         " e.g. default KPS=2 GATES_IN_EPILOGUE=1); the first is the row's speed-up, each other gets its own")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "prefill.json"))
    a = ap.parse_args()
    # the first setting is the row's "sea" (and its speed-up); each other is "sea@<setting>"
    launches = {("sea" if n == 0 else f"sea@{text}"): parse_launch(text) for n, text in enumerate(a.sea_launch)}
    device = torch.device(a.device)
    model, described = build_model(a.model, device, max(a.tokens), a.gguf, a.layers)
    cfg = sea_block_rows(device, max(a.tokens), a.block_K)
    attach_sea(model, cfg)
    for p in predictors(model):
        p.to(torch.bfloat16)
    if device.type == "cuda" and not a.eager_layers:
        compile_predictors(model)
        compile_decoder_layers(model)  # both attentions: norms, rotary and MLP fused around the attention call
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"{described}; SEA block rows K={cfg.predictor_length}, {cfg.block_keys} keys/query, blocks of {cfg.block_size}")
    print("    T  batch | dense eager   graph | SEA eager   graph | speed-up (each in its faster form)")
    for T in a.tokens:
        for B in a.batch:
            ids = torch.randint(0, model.config.vocab_size, (B, T), device=device, generator=gen)
            entry = {"T": T, "batch": B}
            for mode in ("dense", *launches):
                try:
                    with forward_launch(launches.get(mode, {})):
                        entry[mode] = time_prefill(model, mode.split("@")[0], ids, graph=not a.no_graph)
                except torch.OutOfMemoryError:
                    entry[mode] = {"error": "out of memory"}
                    torch.cuda.empty_cache()
                except Exception as err:  # noqa: BLE001  (one failed length is reported; the others still run)
                    entry[mode] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            ok = all("eager_ms" in entry[m] for m in ("dense", "sea"))
            if ok:
                (dense, dense_form), (sea, sea_form) = best(entry["dense"]), best(entry["sea"])
                entry["speedup"] = dense / sea
                entry["speedup_from"] = f"dense {dense_form}, SEA {sea_form}"
            rows.append(entry)
            cells = [f"{entry[m].get(k, float('nan')):8.1f}" for m in ("dense", "sea") for k in ("eager_ms", "graph_ms")]
            speed = f"{entry['speedup']:.2f}x ({entry['speedup_from']})" if ok else "-"
            print(f"{T:>6} {B:>5} | {cells[0]} {cells[1]} | {cells[2]} {cells[3]} | {speed}", flush=True)
            for other in list(launches)[1:]:  # the other launch settings: SEA's time and speed-up under each
                if "eager_ms" in entry[other] and ok:
                    entry[other]["speedup"] = best(entry["dense"])[0] / best(entry[other])[0]
                    print(f"       {other}: eager {entry[other]['eager_ms']:.1f} graph "
                          f"{entry[other].get('graph_ms', float('nan')):.1f} ms: {entry[other]['speedup']:.2f}x")
            for m in ("dense", *launches):
                for key in ("graph_error", "error"):
                    if key in entry[m]:
                        print(f"       {m}: {entry[m][key]}")
            write_rows(a.json, device, described, cfg, rows, layers_compiled=device.type == "cuda" and not a.eager_layers,
                       forward_launch={**bsa.FORWARD_LAUNCH, **launches["sea"]})
    print("wrote", a.json)
    if a.profile:
        profile_prefill(model, torch.randint(0, model.config.vocab_size, (1, a.tokens[0]), device=device, generator=gen))


def profile_prefill(model, ids: torch.Tensor) -> None:
    """Where a prefill's time goes (eager, one batch of one): the kernels by CUDA time, SEA then dense."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    for mode in ("sea", "dense"):
        with torch.no_grad(), attention_mode(model, mode):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm
            with profile(activities=activities) as prof:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                if ids.is_cuda:
                    torch.cuda.synchronize()
        sort = "self_cuda_time_total" if ids.is_cuda else "self_cpu_time_total"
        print(f"--- {mode} prefill, T={ids.shape[1]}, by {sort}")
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
