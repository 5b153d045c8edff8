"""benchmarks/content_term_probe.py on a tiny converted model (CPU): the content score is a distribution over each
query block's causal key blocks, weight 0 leaves SEA exactly as it is, weight 1 selects by the content score alone,
and the script writes a row per weight."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import perturb_predictors, tiny_model
from kernels import dispatch
from sea_convert.checkpoint import save_converted
from sea_convert.integration import attach_sea, attention_mode
from sea_convert.recipe import ModelSource, SEAConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import content_term_probe as probe  # noqa: E402

SEA = SEAConfig(k=16, predictor_length=64, block_size=16, block_keys=48, position_table_len=1024)


def test_content_scores_are_causal_distributions():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 70, 8, generator=g), torch.randn(2, 3, 70, 8, generator=g)
    for keys in ("mean", "bound"):
        p = probe.content_scores(q, k, 8 ** -0.5, 16, keys)  # 70 rows: 5 blocks, the last one partial
        assert p.shape == (2, 3, 5, 5)
        assert torch.allclose(p.sum(-1), torch.ones(2, 3, 5))
        assert (p.triu(1) == 0).all()


def test_bound_sees_one_needle_key_that_the_mean_averages_away():
    """Quest's bound ranks first the block that holds one key aligned with the queries; block means do not."""
    d, bs = 8, 16
    q = torch.zeros(1, 1, 4 * bs, d)
    q[..., 0] = 1.0  # every query points along channel 0
    k = torch.zeros(1, 1, 4 * bs, d)
    k[..., 1] = 1.0
    k[0, 0, bs : 2 * bs, 0] = 0.3  # block 1: every key a little along channel 0
    k[0, 0, 2 * bs + 5, 0] = 3.0  # block 2: one needle key strongly along it
    mean = probe.content_scores(q, k, 1.0, bs, "mean")[0, 0, 3, :3]
    bound = probe.content_scores(q, k, 1.0, bs, "bound")[0, 0, 3, :3]
    assert int(mean.argmax()) == 1 and int(bound.argmax()) == 2


def test_weight_zero_is_sea_and_weight_one_selects_by_content(tmp_path, smollm2_tokenizer):
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer)).eval()
    attach_sea(model, SEA)
    perturb_predictors(model)  # so their choice differs from the content score's
    ids = torch.randint(0, len(smollm2_tokenizer), (1, 200))
    with torch.no_grad(), attention_mode(model, "sea"):
        plain = model(input_ids=ids).logits
        with probe.content_term(0.0):
            assert torch.equal(model(input_ids=ids).logits, plain)
        with probe.content_term(1.0) as seen:
            mixed = model(input_ids=ids).logits
    assert not torch.equal(mixed, plain)
    # weight 1: the last layer's lists are the content score's top blocks (sink and local kept)
    scores = probe.content_scores(seen["q"], seen["k"], seen["scale"], SEA.block_size)
    causal = torch.ones(13, 13, dtype=torch.bool).tril()
    budget = probe.block_budget(SEA)
    index, count = dispatch.ops(SEA.backend, ids.device).select_key_blocks(
        scores.masked_fill(~causal, float("-inf")), budget, max_budget=budget.bound(13) * scores.shape[1])
    assert torch.equal(seen["selection"].block_count, count)
    assert torch.equal(seen["selection"].block_index, index)
    path = save_converted(model, smollm2_tokenizer, SEA, ModelSource(hub="x/tiny"), tmp_path / "ck")
    out = tmp_path / "probe.json"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "content_term_probe.py"), str(path), "--weights", "0",
                          "1", "--lengths", "300", "--depths", "0.5", "--per-cell", "1", "--text", str(text), "--ctx",
                          "128", "--windows", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(out.read_text())
    assert [r["weight"] for r in info["rows"]] == [0.0, 1.0]
    assert all(0.0 <= r["passkey"]["mean"] <= 1.0 and r["sea_ppl"] > 1.0 and 0.0 < r["density"] <= 1.0 for r in info["rows"])
    assert "content weight" in res.stdout
