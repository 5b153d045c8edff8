"""Do SEA's trained output gates help perplexity? A converted checkpoint scored with its gates as trained, with the
gates put back to their initial values, and with the gates off (no probability scale, no running-mean mix).

    python3 benchmarks/gates_probe.py outputs/smollm2-135m-sea --ctx 1024 --windows 8 \
        --json docs/results/gates_probe_cpu_default_2026-12-07.json

Why: on the GPU at 2k, stage A without its output-MSE term (the only loss that reaches the gates) landed 0.69% below
the oracle where the recipe's stage A sits 0.10% above it (docs/quality.md, issue 22's levers). The gates' initial
values are SEAPredictor's (GATE_BIAS_INIT): s0 = 0 (probability scale 1) and s1 = -3 (a sigmoid(-3) x u mix of the
running mean of v).
"Off" sets s1 = -30 (mix ~1e-13) and s0 = 0: what remains is plain sparse attention over SEA's selection.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from sea_convert.attention.predictor import GATE_BIAS_INIT  # noqa: E402
from sea_convert.checkpoint import load  # noqa: E402
from sea_convert.data import eval_windows  # noqa: E402
from sea_convert.evaluate import mode_perplexity  # noqa: E402
from sea_convert.integration import predictors  # noqa: E402

GATES_OFF = (0.0, -30.0)


def set_gates(preds, bias: tuple[float, float]) -> None:
    """These predictors' gates to a constant (weights 0): the same s0, s1 for every row."""
    for pred in preds:
        pred.gates.weight.zero_()
        pred.gates.bias.copy_(torch.tensor(bias))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "austen.txt")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    model, tokenizer = load(a.checkpoint)
    model.eval()
    if any(p.gates is None for p in predictors(model)):
        raise SystemExit(f"{a.checkpoint}: its predictors have no output gates (sea.output_gates is false)")
    ids = torch.tensor(tokenizer(a.text.read_text(encoding="utf-8")[-400_000:])["input_ids"])
    windows = eval_windows(ids, a.ctx, a.windows)
    t = time.perf_counter()
    rows: dict[str, dict] = {}
    with torch.no_grad():
        teacher, _ = mode_perplexity(model, windows, "dense")
        oracle, _ = mode_perplexity(model, windows, "oracle")
        for name, bias in (("trained", None), ("at_init", GATE_BIAS_INIT), ("off", GATES_OFF)):
            if bias is not None:
                set_gates(predictors(model), bias)
            ppl, density = mode_perplexity(model, windows, "sea")
            rows[name] = {"sea_ppl": ppl, "ratio": ppl / teacher, "density": density}
    print(f"{a.checkpoint}: {windows.shape[0]} x {a.ctx} held-out tokens; teacher {teacher:.3f}, "
          f"oracle {oracle:.3f} (x{oracle / teacher:.4f})")
    print("SEA's gates | perplexity (x teacher) | density")
    for name, r in rows.items():
        print(f"{name:11s} | {r['sea_ppl']:.3f} (x{r['ratio']:.4f}) | {r['density']:.3f}")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"checkpoint": str(a.checkpoint), "ctx": a.ctx, "windows": int(windows.shape[0]),
                                      "teacher_ppl": teacher, "oracle_ppl": oracle, "sea": rows,
                                      "seconds": round(time.perf_counter() - t, 1), "device": "cpu"}, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
