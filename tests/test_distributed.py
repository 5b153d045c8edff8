"""The parallel stage A on CPU without Ray: distributed checkpoints (local and S3), the teacher built
on the meta device and read shard by shard, the recipe's checks, and the pipeline on 2 torchrun
workers. Ray Train and the killed-worker resumes are in test_ray_train.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import HELD_OUT_TEXT, TRAIN_TEXT, _free_port, make_bucket, s3_options
from sea_convert.checkpoint import PREDICTORS_FILE
from sea_convert.distill import StageATrainer
from sea_convert.integration import attach_sea
from sea_convert.recipe import Recipe, RecipeError, SEAConfig, StageAConfig, parse_recipe
from sea_convert.train_state import ResumeError
from workers.train.dist_checkpoint import DistCheckpoints
from workers.train.parallel import shard_teacher
from workers.train.sharded_load import build_skeleton, load_sharded_weights, materialize
from workers.train.train_launch import launch_ray, launch_torchrun, worker_config
from workers.train.train_worker import train_worker

STEPS, EVERY = 16, 4


def _recipe(model_dir: Path, workers: int, launcher: str = "ray", **distill) -> Recipe:
    return Recipe.model_validate({
        "name": "tiny-parallel",
        "model": {"path": str(model_dir)},
        "sea": {"mode": "block", "k": 16, "predictor_length": 32, "block_size": 16, "block_keys": 32},
        "data": {"train": {"path": str(TRAIN_TEXT)}, "held_out": {"path": str(HELD_OUT_TEXT)},
                 "seq_len": 128, "held_out_tokens": 1024, "max_train_tokens": 40000},
        "distill": {"stage_a": {"steps": STEPS, "batch_size": 4, "lr": 0.003, "warmup_steps": 2}, "device": "cpu",
                    "checkpoint_every": EVERY, "parallel": {"workers": workers, "launcher": launcher}, **distill},
        "validate": {"perplexity": {"ctx": 128, "max_windows": 2}, "mmlu": {"enabled": False}, "picture": False},
    })


def _run(tmp_path: Path, name: str, recipe: Recipe) -> tuple[dict, dict]:
    config = worker_config(recipe, tmp_path / name / "out", tmp_path / name / "state")
    if recipe.distill.parallel.workers == 1:
        result = train_worker(config)
    elif recipe.distill.parallel.launcher == "ray":
        result = launch_ray(recipe, config, tmp_path / name / "ray")
    else:
        result = launch_torchrun(recipe, config, tmp_path / name / "torchrun")
    return result, load_file(str(Path(config["out_dir"]) / PREDICTORS_FILE))


def test_checkpoints_on_s3_round_trip_and_refuse_another_recipe(tiny_model_dir, s3_endpoint, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval().requires_grad_(False)
    sea = SEAConfig(mode="block", k=16, predictor_length=32, block_size=16, block_keys=32)
    attach_sea(model, sea)
    trainer = StageATrainer(model, sea, StageAConfig(steps=6, batch_size=2, lr=3e-3, warmup_steps=1))
    batch = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        trainer.step(batch)
    uri = f"s3://{make_bucket(s3_endpoint, 'dcp')}/runs/tiny"
    ckpts = DistCheckpoints(uri, s3_options(s3_endpoint), keep=1)
    ckpts.save(3, model, trainer, {"fingerprint": "abc", "note": "kept"})
    trainer.step(batch)
    ckpts.save(4, model, trainer, {"fingerprint": "abc", "note": "kept"})
    ckpts.fs.pipe(f"{ckpts.root}/step-00000009/__0_0.distcp", b"half-written")  # no .metadata: not a checkpoint
    assert ckpts.complete_steps() == [4]  # keep=1 pruned step 3
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    adam = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    trainer.step(batch)  # move away from the saved state

    extra = ckpts.load(ckpts.latest(), model, trainer, "abc")
    assert extra["note"] == "kept" and trainer.step_count == 4
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, expected[n]), n
    restored = trainer.optimizer.state_dict()["state"][0]
    assert all(torch.equal(restored[k], adam[k]) for k in adam)
    with pytest.raises(ResumeError, match="different recipe"):
        ckpts.load(4, model, trainer, "another")


def _meta_vs_whole(rank: int, world: int, folder: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build_skeleton(AutoConfig.from_pretrained(folder), torch.float32)
    attach_sea(model, SEAConfig(k=8, predictor_length=32, block_size=16, block_keys=16), device="cpu")
    assert all(p.is_meta for n, p in model.named_parameters() if "sea_predictor" not in n)
    shard_teacher(model)
    materialize(model, torch.device("cpu"))
    read = load_sharded_weights(model, Path(folder))
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([read]))
    if rank == 0:
        torch.save({"hidden": hidden, "read": [int(s) for s in sizes]}, out)
    # every rank done with the sharded model before the group goes: a rank that tore its gloo pairs down
    # while its peer still held FSDP state aborted in CI ("terminate called without an active exception")
    del model
    dist.barrier()
    dist.destroy_process_group()


def test_a_teacher_built_on_the_meta_device_reads_only_its_shard_and_computes_what_the_whole_model_does(
        tiny_model_dir, tmp_path):
    out = tmp_path / "meta.pt"
    mp.spawn(_meta_vs_whole, args=(2, str(tiny_model_dir), str(out), _free_port()), nprocs=2)
    whole = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = whole.model(input_ids=ids).last_hidden_state
    got = torch.load(out)
    total = sum(p.numel() * p.element_size() for p in whole.parameters())
    print(f"\nmeta build over 2 ranks: bytes read per rank {got['read']} of {total};"
          f" hidden states max |diff| {(got['hidden'] - expected).abs().max().item():.2e}")
    assert sum(got["read"]) == total and max(got["read"]) < 0.6 * total
    torch.testing.assert_close(got["hidden"], expected, rtol=1e-5, atol=1e-5)


def test_parallel_settings_are_checked_when_the_recipe_is_read(tiny_model_dir):
    base = _recipe(tiny_model_dir, 1).model_dump(mode="json", by_alias=True)
    odd = json.loads(json.dumps(base))
    odd["distill"]["parallel"]["workers"] = 3
    with pytest.raises(RecipeError, match="batch_size .4. must be a multiple of distill.parallel.workers .3."):
        parse_recipe(odd)
    with_b = json.loads(json.dumps(base))
    with_b["distill"]["parallel"]["workers"] = 2
    with_b["distill"]["stage_b"] = {"steps": 2}
    with pytest.raises(RecipeError, match="runs stage A only"):
        parse_recipe(with_b)
    with_b["distill"]["parallel"].update(workers=1, launch_single=True)  # one worker, still launched
    with pytest.raises(RecipeError, match="runs stage A only"):
        parse_recipe(with_b)
    with_b["distill"]["parallel"]["launch_single"] = False  # one worker in the stage's own process: stage B is fine
    assert not parse_recipe(with_b).distill.parallel.launched
    bad_uri = json.loads(json.dumps(base))
    bad_uri["distill"]["parallel"]["checkpoint_uri"] = "gs://bucket/x"
    with pytest.raises(RecipeError, match="distill.parallel.checkpoint_uri"):
        parse_recipe(bad_uri)


def test_the_pipeline_runs_a_parallel_stage_a_and_validates_and_publishes_its_result(tiny_model_dir, tmp_path):
    """distill on 2 torchrun workers -> validate (the teacher's reference measured there) -> publish."""
    from sea_convert import checkpoint
    from workers.pipeline.stages import run_pipeline

    recipe = _recipe(tiny_model_dir, 2, "torchrun")
    result = run_pipeline(recipe, tmp_path / "converted", log=lambda msg: print(msg, flush=True))
    report = result.report
    assert report["distill"]["steps"] == STEPS
    assert report["distill_history"][0]["workers"] == 2
    ppl = report["perplexity"]
    assert ppl["teacher_ppl"] > 1 and ppl["sea_ppl"] > 1
    model, _ = checkpoint.load(result.checkpoint)  # base weights written by publish, predictors from the workers
    trained = load_file(str(result.checkpoint / PREDICTORS_FILE))
    assert set(trained) and not (tmp_path / "converted.work").exists()
    print(f"\npipeline with 2 workers: teacher ppl {ppl['teacher_ppl']:.3f}, SEA {ppl['sea_ppl']:.3f}")


def test_the_scaling_benchmark_reads_launcher_and_kill_from_each_run_and_refuses_others(monkeypatch):
    """benchmarks/distributed_scaling.py (issue 25's table): name:workers[:ray|:torchrun][:kill], all checked before
    the first run starts. (The runs themselves were checked with tiny:1,tiny:2,tiny:2:ray,tiny:2:ray:kill: about a
    minute, docs/distributed.md.)"""
    import importlib.util

    benchmarks = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # as when it runs as a script: bench_models beside it
    spec = importlib.util.spec_from_file_location("distributed_scaling", benchmarks / "distributed_scaling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_run("smollm2:2") == ("smollm2", 2, "torchrun", False)
    assert bench.parse_run("smollm2:2:ray:kill") == ("smollm2", 2, "ray", True)
    assert bench.parse_run("llama13b:1:torchrun") == ("llama13b", 1, "torchrun", False)
    for bad in ("smollm2", "smollm2:two", "smollm2:2:mpi"):
        with pytest.raises(SystemExit, match="name:workers"):
            bench.parse_run(bad)
    recipe, extra = bench.run_spec("tiny", 2, 6, 16, False, "ray", kill=True)
    assert recipe.distill.parallel.launcher == "ray" and recipe.distill.parallel.max_failures == 1
    assert (Path(recipe.model.path) / "config.json").is_file() and "synthetic" in extra
