"""How far cached decoding and a full re-run of the prefix drift apart at the model level, by predictor rows,
budget and gates (docs/decoding.md, "Where equals full recompute stops"). CPU, fp32, the tests' tiny llama
with trained-looking random predictors; 47 cached steps after a 9-token prompt.

    .venv/bin/python benchmarks/decode_recompute_gap.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_decoding import _incremental_vs_full  # noqa: E402
from conftest import tiny_model  # noqa: E402
from sea_convert.integration import attach_sea  # noqa: E402
from sea_convert.recipe import SEAConfig  # noqa: E402


def main() -> None:
    print("| predictor rows | block_keys (blocks of 4) | gates | max logit error, cached vs full recompute |")
    print("|---|---|---|---|")
    for rows, keys, gates in [("token", 8, True), ("token", 16, True), ("block", 8, True), ("block", 16, True),
                              ("block", 16, False)]:
        torch.manual_seed(0)
        model = tiny_model("llama", seed=0)
        attach_sea(model, SEAConfig(mode="block", predictor_rows=rows, k=8, predictor_length=16, block_size=4,
                                    block_keys=keys, nbf=2, output_gates=gates))
        with torch.no_grad():
            for attn in (m for m in model.modules() if hasattr(m, "sea_predictor")):
                for p in attn.sea_predictor.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
        ids = torch.randint(0, 128, (1, 56), generator=torch.Generator().manual_seed(1))
        errors = _incremental_vs_full(model, ids, prompt=9)
        print(f"| {rows} | {keys} | {'on' if gates else 'off'} | {max(errors):.2e} |")


if __name__ == "__main__":
    main()
