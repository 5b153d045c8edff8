"""benchmarks/gates_probe.py on a tiny converted model (CPU): "off" gates leave plain sparse attention over SEA's own
selection (what the probe's table claims), "at init" is SEAPredictor's initial gates, and the script writes its
three rows."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_model
from kernels import dispatch
from sea_convert.attention.layer import sea_attention
from sea_convert.attention.predictor import SEAPredictor
from sea_convert.checkpoint import save_converted
from sea_convert.integration import attach_sea, predictors
from sea_convert.recipe import ModelSource, SEAConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gates_probe  # noqa: E402

SEA = SEAConfig(k=16, predictor_length=64, block_size=16, block_keys=48, position_table_len=1024)


def test_gates_off_leave_plain_sparse_attention_over_the_same_selection():
    torch.manual_seed(0)
    pred = SEAPredictor(SEA, num_heads=4, num_kv_heads=2, head_dim=8, table_len=1024, layer_idx=0)
    with torch.no_grad():  # trained-looking gates first, so "off" has something to undo
        pred.gates.bias.copy_(torch.tensor([1.5, 0.5]))
    q, k, v = torch.randn(1, 4, 90, 8), torch.randn(1, 2, 90, 8), torch.randn(1, 2, 90, 8)
    ops = dispatch.ops(SEA.backend, q.device)
    with torch.no_grad():
        gated = sea_attention(q, k, v, pred, SEA, 8 ** -0.5).out
        gates_probe.set_gates([pred], gates_probe.GATES_OFF)
        res = sea_attention(q, k, v, pred, SEA, 8 ** -0.5)
        plain, _ = res.selection.attend(q, k, v, 8 ** -0.5, ops)
    # measured difference 0 over 5 seeds (w ~ 1e-13 x u rounds away in fp32); 1e-6 leaves room for other backends
    assert torch.allclose(res.out.float(), plain.float(), atol=1e-6)
    assert not torch.allclose(gated.float(), plain.float(), atol=1e-3)


def test_at_init_is_the_predictors_initial_gates_and_the_script_writes_three_rows(tmp_path, smollm2_tokenizer):
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer)).eval()
    attach_sea(model, SEA)
    init = [(p.gates.weight.clone(), p.gates.bias.clone()) for p in predictors(model)]
    with torch.no_grad():
        for p in predictors(model):
            p.gates.weight.add_(0.5)
            p.gates.bias.add_(1.0)
        gates_probe.set_gates(predictors(model), gates_probe.GATE_BIAS_INIT)
    for p, (w, b) in zip(predictors(model), init, strict=True):
        assert torch.equal(p.gates.weight, w) and torch.equal(p.gates.bias, b)
    path = save_converted(model, smollm2_tokenizer, SEA, ModelSource(hub="x/tiny"), tmp_path / "ck")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "gates.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gates_probe.py"), str(path), "--text", str(text),
                          "--ctx", "128", "--windows", "2", "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(out.read_text())
    assert list(info["sea"]) == ["trained", "at_init", "off"]
    assert all(r["sea_ppl"] > 1.0 and 0.0 < r["density"] <= 1.0 for r in info["sea"].values())
    assert info["teacher_ppl"] > 1.0 and "SEA's gates" in res.stdout
