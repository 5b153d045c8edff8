"""Would a content term in SEA's block selection bring the pass key back, and at what perplexity? A probe, not the
method: for each weight w, block mode ranks (1 - w) x SEA's block scores + w x a pooled content score, then the
converted checkpoint is asked for the pass key and scored on held-out text (prefill only, CPU is enough).

    python3 benchmarks/content_term_probe.py outputs/smollm2-135m-sea --weights 0 0.25 0.5 1 \\
        --lengths 1024 2048 --json docs/results/content_term_probe.json

The content score of query block i over key block j: softmax over i's causal key blocks of (the mean query of i's
rows) . (the mean key of j) x scale, averaged over each KV head's query heads (MoBA's and Quest's family; the
diagnostic benchmarks/passkey_where_lost.py ranks the key's block 1-4 with it where SEA ranks it at chance). It
reads the whole query block's rows, as token rows' pooling and the oracle do in a prefill; SEA's scores are
normalised to sum to 1 over the same blocks before the mix. w = 0 is SEA unchanged (checked: the same verdicts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from sea_convert.attention import layer as sea_layer  # noqa: E402
from sea_convert.attention.predictor import SEAPredictor  # noqa: E402
from sea_convert.attention.select import Selection, block_budget, block_selection_scores, select  # noqa: E402
from sea_convert.checkpoint import load  # noqa: E402
from sea_convert.data import eval_windows  # noqa: E402
from sea_convert.evaluate import mode_perplexity  # noqa: E402
from sea_convert.passkey import make_grid, passkey_accuracy  # noqa: E402


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, T, d) -> each block's mean row (B, H, NB, d) fp32; a partial last block averages the rows it has."""
    B, H, T, d = x.shape
    nb = math.ceil(T / block_size)
    counts = torch.full((nb,), float(block_size), device=x.device)
    counts[-1] = T - (nb - 1) * block_size
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block_size - T))
    return x.view(B, H, nb, block_size, d).sum(3) / counts[:, None]


def content_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, keys: str = "mean") -> torch.Tensor:
    """(B, Hkv, NQB, NKB) probabilities over each query block's causal key blocks (see the module's docstring).
    keys: "mean", each key block's mean key; "bound", Quest's upper bound of q.k over the block's keys from their
    per-channel min and max (a single needle key is not averaged away)."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    nb = math.ceil(T / block_size)
    pad = nb * block_size - T
    qm = block_means(q, block_size)
    if keys == "mean":
        km = block_means(k, block_size).repeat_interleave(Hq // Hkv, 1)
        logits = (qm @ km.transpose(-1, -2)) * scale  # (B, Hq, NQB, NKB)
    else:  # Quest: sum over channels of max(q_c * kmax_c, q_c * kmin_c)
        kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, Hkv, nb, block_size, d)
        valid = (torch.arange(nb * block_size, device=k.device) < T).view(nb, block_size)[None, None, :, :, None]
        kmax = kp.masked_fill(~valid, float("-inf")).amax(3).repeat_interleave(Hq // Hkv, 1)
        kmin = kp.masked_fill(~valid, float("inf")).amin(3).repeat_interleave(Hq // Hkv, 1)
        hi = qm[..., :, None, :] * kmax[..., None, :, :]
        lo = qm[..., :, None, :] * kmin[..., None, :, :]
        logits = torch.maximum(hi, lo).sum(-1) * scale
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    return probs.view(B, Hkv, Hq // Hkv, nb, nb).mean(2)


@contextlib.contextmanager
def content_term(weight: float, keys: str = "mean"):
    """Inside: block mode's selection ranks the mix (the predictor's forward hands over q and k). Yields what the
    last layer saw: its q, k, scale and selection."""
    seen: dict = {}
    forward, plain_select = SEAPredictor.forward, sea_layer.select

    def recording_forward(self, q, k, v, scale, ops, keep_image=False):
        seen.update(q=q, k=k, scale=scale)
        return forward(self, q, k, v, scale, ops, keep_image)

    def mixed_select(probs, cfg, num_kv_heads, ops, valid=None, seq_len=None):
        if weight == 0.0 or cfg.mode != "block" or valid is not None:
            seen["selection"] = plain_select(probs, cfg, num_kv_heads, ops, valid=valid, seq_len=seq_len)
            return seen["selection"]
        sea = block_selection_scores(probs, cfg, num_kv_heads, ops)
        nq, nk = sea.shape[-2:]
        causal = torch.ones(nq, nk, dtype=torch.bool, device=sea.device).tril()
        sea = sea.float().masked_fill(~causal, 0.0).clamp_min(0.0)
        sea = sea / sea.sum(-1, keepdim=True).clamp_min(1e-12)
        content = content_scores(seen["q"], seen["k"], seen["scale"], cfg.block_size, keys)[..., :nq, :nk]
        scores = ((1.0 - weight) * sea + weight * content).masked_fill(~causal, float("-inf"))
        budget = block_budget(cfg)
        index, count = ops.select_key_blocks(scores, budget, max_budget=budget.bound(nk) * num_kv_heads)
        seen["selection"] = Selection("block", seq_len or probs.shape[2], block_index=index, block_count=count,
                                      block_size=cfg.block_size)
        return seen["selection"]

    SEAPredictor.forward, sea_layer.select = recording_forward, mixed_select
    try:
        yield seen
    finally:
        SEAPredictor.forward, sea_layer.select = forward, plain_select


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    ap.add_argument("--per-cell", type=int, default=2)
    ap.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--keys", choices=["mean", "bound"], default="mean", help="content score's key side (content_scores)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    model, tokenizer = load(a.checkpoint)
    model.eval()
    samples = make_grid(tokenizer, a.lengths, a.depths, a.per_cell, seed=0)
    ids = torch.tensor(tokenizer(a.text.read_text(encoding="utf-8")[-400_000:])["input_ids"])
    windows = eval_windows(ids, a.ctx, a.windows)
    teacher_ppl, _ = mode_perplexity(model, windows, "dense")
    dense = passkey_accuracy(model, samples, ("dense",))["dense"]
    rows = []
    print(f"{a.checkpoint}: {len(samples)} pass-key prompts ({a.lengths} tokens), {windows.shape[0]} x {a.ctx} held-out")
    print(f"teacher: pass key {dense['mean']:.3f}, perplexity {teacher_ppl:.3f}")
    print("content weight | SEA pass key | SEA perplexity (x teacher) | density | seconds")
    for w in a.weights:
        t = time.perf_counter()
        with content_term(w, a.keys), torch.no_grad():
            acc = passkey_accuracy(model, samples, ("sea",))["sea"]
            ppl, density = mode_perplexity(model, windows, "sea")
        rows.append({"weight": w, "passkey": acc, "sea_ppl": ppl, "ratio": ppl / teacher_ppl, "density": density,
                     "seconds": round(time.perf_counter() - t, 1)})
        print(f"{w:14.2f} | {acc['mean']:12.3f} | {ppl:8.3f} (x{ppl / teacher_ppl:.4f}) | {density:.3f} | "
              f"{rows[-1]['seconds']}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"checkpoint": str(a.checkpoint), "keys": a.keys, "lengths": a.lengths, "depths": a.depths,
                                      "per_cell": a.per_cell, "ctx": a.ctx, "windows": int(windows.shape[0]),
                                      "teacher": {"passkey": dense, "ppl": teacher_ppl}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
