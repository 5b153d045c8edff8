"""Evaluation: perplexity of teacher and SEA on the same windows, and the attention picture."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from sea_convert.progress import progress_bar

from kernels import dispatch
from kernels.bins import key_bins
from sea_convert.attention import measure_density, select
from sea_convert.integration import attention_mode, attention_modules, capture_attention, predictors


@dataclass
class PerplexityReport:
    teacher_ppl: float
    sea_ppl: float
    ppl_ratio: float
    density: float  # kept / causal attention entries, over every SEA layer and window
    ctx: int
    tokens: int  # tokens scored (ctx - 1 per window)
    windows: int
    oracle_ppl: float | None = None  # true top blocks at the same budget (block mode), the ceiling for any estimator
    oracle_density: float | None = None
    teacher_seconds: float | None = None  # wall time of each pass over the windows
    sea_seconds: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, mode: str, progress: bool = False, desc: str = "") -> tuple[float, int]:
    """Summed next-token NLL and token count over non-overlapping windows (B, ctx), one window per pass."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with attention_mode(model, mode):
        for row in progress_bar(windows, desc=desc or mode, disable=not progress, leave=False):
            ids = row.unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total, count


def mode_perplexity(model, windows: torch.Tensor, mode: str, progress: bool = False) -> tuple[float, float]:
    """(perplexity, density) of one attention mode on the windows; density is 1 for dense attention."""
    with measure_density() as meter:
        nll, n = window_nll(model, windows, mode, progress, f"{mode} ppl")
    return math.exp(nll / n), (1.0 if mode == "dense" else meter.density)


def compare_perplexity(model, windows: torch.Tensor, progress: bool = False, oracle: bool = False) -> PerplexityReport:
    """Teacher (dense) and SEA perplexity on exactly the same windows; optionally the oracle's too."""
    t0 = time.perf_counter()
    teacher, _ = mode_perplexity(model, windows, "dense", progress)
    t1 = time.perf_counter()
    sea, density = mode_perplexity(model, windows, "sea", progress)
    t2 = time.perf_counter()
    n = windows.shape[0] * (windows.shape[1] - 1)
    report = PerplexityReport(teacher, sea, sea / teacher, density, windows.shape[1], n, windows.shape[0],
                              teacher_seconds=round(t1 - t0, 2), sea_seconds=round(t2 - t1, 2))
    if oracle:
        report.oracle_ppl, report.oracle_density = mode_perplexity(model, windows, "oracle", progress)
    return report


@torch.no_grad()
def attention_picture(model, input_ids: torch.Tensor, path: str | Path, layer: int | None = None, heads=None) -> Path:
    """PNG: for one sample and a few heads, teacher attention | SEA estimate | chosen mask, side by side.

    The estimate (K bins per row) is drawn in key coordinates: each key gets its bin's
    probability spread over the bin's width (block rows: every query row shows its block's row, and
    each key its key block's share). Builds T x T pictures: keep T small (<= 512).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds = predictors(model)
    layer = len(preds) // 2 if layer is None else layer
    device = next(model.parameters()).device
    ids = input_ids.reshape(1, -1).to(device)
    with capture_attention(model) as cap:
        model(input_ids=ids, use_cache=False)
    c = cap[layer]
    sea_cfg = attention_modules(model)[layer].sea_config  # the module's own settings (config.sea may carry save metadata)
    ops = dispatch.ops(sea_cfg.backend, device)
    T = c.q.shape[2]
    est = preds[layer](c.q, c.k, c.v, c.scale, ops)
    probs = est.log_probs.exp()
    sel = select(probs, sea_cfg, c.k.shape[1], ops, seq_len=T)
    Hq, Hkv = c.q.shape[1], c.k.shape[1]
    rows = torch.arange(T, device=device)
    bins = key_bins(rows, T, sea_cfg.predictor_length)  # (T, T)
    causal = torch.arange(T, device=device)[None, :] <= rows[:, None]
    widths = torch.zeros(T, sea_cfg.predictor_length, device=device).scatter_add_(-1, bins, causal.float())
    scores = (c.q.float() @ c.k.float().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * c.scale
    teacher = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)[0]
    if heads is None:  # one query head from each of the first three KV groups: their masks differ
        heads = [kv * (Hq // Hkv) for kv in range(min(3, Hkv))]
    heads = [h for h in heads if h < Hq]
    fig, axes = plt.subplots(len(heads), 3, figsize=(12, 4 * len(heads)), squeeze=False)
    keys = torch.arange(T, device=device)
    for r, h in enumerate(heads):
        kv = h // (Hq // Hkv)
        if est.block_size is not None:  # block rows: (query block, key block) scores, spread over the block's keys
            bs = est.block_size
            per_block = ops.block_scores_from_bins(probs[:, h : h + 1], probs.shape[2])[0, 0]
            est_keys = (per_block[rows // bs][:, keys // bs] / bs).masked_fill(~causal, 0)
        else:
            est_keys = (probs[0, h].gather(-1, bins) / widths.gather(-1, bins).clamp_min(1)).masked_fill(~causal, 0)
        if sel.mode == "block":
            bs = sel.block_size
            valid = torch.arange(sel.block_index.shape[-1], device=device) < sel.block_count[0, kv, :, None]
            blk = torch.zeros(sel.block_index.shape[2], math.ceil(T / bs) + 1, dtype=torch.bool, device=device)
            blk.scatter_(-1, torch.where(valid, sel.block_index[0, kv].long(), blk.shape[1] - 1), True)
            mask = blk[rows // bs][:, keys // bs] & causal
        else:
            mask = sel.bin_mask[0, kv].gather(-1, bins) & causal
        for col, (img, title) in enumerate(
            [(teacher[h], "teacher attention"), (est_keys, "SEA estimate"), (mask.float(), "chosen mask")]
        ):
            ax = axes[r][col]
            shown = img.detach().float().cpu()
            if col < 2:
                shown = shown.clamp_min(1e-6).log10()
            ax.imshow(shown.numpy(), cmap="magma" if col < 2 else "gray", interpolation="nearest")
            ax.set_title(f"layer {layer} head {h}: {title}" + (" (log10)" if col < 2 else ""))
            ax.set_xlabel("key")
            ax.set_ylabel("query")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
