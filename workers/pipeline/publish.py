"""The publish stage: write the converted checkpoint folder (object storage: workers/pipeline/storage.py)."""

from __future__ import annotations

from pathlib import Path

from sea_convert.checkpoint import save_converted
from sea_convert.recipe import Recipe


def publish_stage(
    recipe: Recipe, model, tokenizer, report: dict, card: str, destination: Path, extra_files: dict[str, Path],
    overwrite: bool, base_finetuned: bool,
) -> Path:
    return save_converted(
        model,
        tokenizer,
        recipe.sea,
        recipe.model,
        destination,
        report=report,
        model_card=card,
        extra_files=extra_files,
        save_base_weights=recipe.output.save_base_weights,
        overwrite=overwrite,
        base_finetuned=base_finetuned,
    )
