"""The CLI's eval and mmlu commands on a saved checkpoint (tiny model, real tokenizer and MMLU file)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from api.cli import app
from conftest import tiny_model
from sea_convert.checkpoint import save_converted
from sea_convert.data import eval_windows, load_texts, tokenize_texts
from sea_convert.evaluate import compare_perplexity
from sea_convert.integration import attach_sea
from sea_convert.recipe import ModelSource, SEAConfig, TextSource

runner = CliRunner()


def _checkpoint(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    sea = SEAConfig(k=32, predictor_length=64, block_size=16)
    attach_sea(model, sea)
    return model, save_converted(model, tokenizer, sea, ModelSource(hub="x/tiny"), tmp_path / "ck")


def test_eval_json_matches_the_library(tmp_path, smollm2_tokenizer):
    model, path = _checkpoint(tmp_path, smollm2_tokenizer)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    res = runner.invoke(app, ["eval", str(path), "--text", str(text), "--ctx", "128", "--max-windows", "3", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)  # stdout holds the JSON alone; the progress lines went to stderr
    assert "ppl" in res.stderr and "\r" not in res.stderr  # plain lines, not a carriage-return bar
    assert {"teacher_ppl", "sea_ppl", "density", "ctx", "tokens"} <= set(got)
    assert got["teacher_seconds"] > 0 and got["sea_seconds"] > 0  # each pass timed
    assert got["ctx"] == 128 and got["tokens"] == 3 * 127 and 0 < got["density"] < 1
    # --device auto: the GPU when the host has one (this one has none), and the report says which ran
    assert got["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    tokens = tokenize_texts(load_texts(TextSource(path=text)), smollm2_tokenizer, add_bos=True)
    expect = compare_perplexity(model, eval_windows(tokens[-65536:], 128, 3))
    assert abs(got["sea_ppl"] - expect.sea_ppl) < 1e-3 * expect.sea_ppl
    assert abs(got["teacher_ppl"] - expect.teacher_ppl) < 1e-3 * expect.teacher_ppl
    res = runner.invoke(app, ["eval", str(path), "--text", str(text), "--ctx", "128", "--max-windows", "2", "--json", "--oracle"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["oracle_ppl"] > 0 and got["oracle_density"] == pytest.approx(got["density"], abs=0.05)


def test_eval_and_mmlu_errors(tmp_path, smollm2_tokenizer):
    _, path = _checkpoint(tmp_path, smollm2_tokenizer)
    res = runner.invoke(app, ["eval", str(path), "--text", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2 and "--text: file not found" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path), "--text", str(path / "config.json")])
    assert res.exit_code == 2 and "not a converted SEA checkpoint" in res.output
    res = runner.invoke(app, ["mmlu", str(path), "--source", "web"])
    assert res.exit_code == 2
    limit = json.loads((path / "config.json").read_text())["max_position_embeddings"]
    text = tmp_path / "t.txt"
    text.write_text("words " * 100)
    res = runner.invoke(app, ["eval", str(path), "--text", str(text), "--ctx", str(limit + 1)])
    assert res.exit_code == 2 and f"--ctx: {limit + 1} is longer than the checkpoint's {limit} positions" in res.output


def test_version():
    from importlib.metadata import version

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"sea-convert {version('sea-convert')}"


def test_mmlu_command(tmp_path, smollm2_tokenizer):
    _, path = _checkpoint(tmp_path, smollm2_tokenizer)
    res = runner.invoke(app, ["mmlu", str(path), "--shots", "1", "--limit", "6", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["questions"] == 6 and 0 <= got["sea_accuracy"] <= 1 and 0 <= got["teacher_accuracy"] <= 1
    assert got["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("command", ["eval", "mmlu", "harness"])
def test_device_option_errors_name_the_option(tmp_path, smollm2_tokenizer, command):
    """A malformed --device, or a GPU the host lacks, stops before any loading: exit 2 and a message naming
    --device."""
    _, path = _checkpoint(tmp_path, smollm2_tokenizer)
    text = tmp_path / "t.txt"
    text.write_text("words " * 100)
    extra = ["--text", str(text), "--ctx", "128"] if command == "eval" else []
    if command == "harness":
        pytest.importorskip("lm_eval")
    res = runner.invoke(app, [command, str(path), *extra, "--device", "tpu"])
    assert res.exit_code == 2 and "--device: 'tpu' is not a device" in res.output, res.output
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: none here
    res = runner.invoke(app, [command, str(path), *extra, "--device", missing])
    assert res.exit_code == 2 and f"--device is '{missing}'" in res.output, res.output


def test_help_on_every_command():
    for cmd in ([], ["run"], ["validate"], ["eval"], ["mmlu"]):
        res = runner.invoke(app, [*cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output
