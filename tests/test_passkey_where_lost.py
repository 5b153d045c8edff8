"""benchmarks/passkey_where_lost.py on a tiny saved checkpoint (CPU): the key line is found where the sample put
it, and a budget that keeps every causal block keeps the key's in both SEA's and the oracle's lists."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import tiny_model
from sea_convert.checkpoint import save_converted
from sea_convert.integration import attach_sea
from sea_convert.passkey import make_sample
from sea_convert.recipe import ModelSource, SEAConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import passkey_where_lost as where  # noqa: E402


def test_passkey_where_lost(tmp_path, smollm2_tokenizer):
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    sea = SEAConfig(k=32, predictor_length=64, block_size=16, block_keys=512)  # more than any row: every block kept
    attach_sea(model, sea)
    path = save_converted(model, smollm2_tokenizer, sea, ModelSource(hub="x/tiny"), tmp_path / "ck")
    sample = make_sample(smollm2_tokenizer, 300, 0.5, "48213")
    span = where.key_span(smollm2_tokenizer, sample)
    assert "48213" in smollm2_tokenizer.decode(sample.ids[span.start : span.stop])
    rows = where.diagnose(model.eval(), smollm2_tokenizer, sample)
    assert len(rows) == model.config.num_hidden_layers
    for r in rows:
        assert r["key_blocks"] == sorted({p // 16 for p in span}) and r["query_block"] == (sample.answer_start - 1) // 16
        assert all(r["sea_kept"]) and all(r["oracle_kept"])
        assert all(0 <= x <= r["query_block"] for x in r["sea_rank"] + r["pooled_rank"] + r["block_pooled_rank"])
        assert all(0 <= x < r["query_block"] for x in r["opening_pooled_rank"])  # blocks before its own only
        assert r["answer_offset"] == [sample.answer_start - 1 - r["query_block"] * 16]
        assert all(0.0 <= m <= 1.0 for m in r["teacher_mass"])
        assert all(-1.0 <= x <= 1.0 for x in r["sea_spearman"] + r["pooled_spearman"])
    out = tmp_path / "where.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "passkey_where_lost.py"), str(path), "--lengths", "300",
                          "--depths", "0.5", "--per-cell", "1", "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(out.read_text())
    assert [r["layer"] for r in info["layers"]] == list(range(model.config.num_hidden_layers))
    assert all(r["sea_kept"] == 1.0 and r["oracle_kept"] == 1.0 for r in info["layers"])
    assert "SEA keeps the key block" in res.stdout
