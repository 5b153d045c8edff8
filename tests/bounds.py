"""Bounds that follow from the math, for comparing training runs that round differently.

Two runs of the same recipe that differ only in float32 summation order (1 process vs 2 ranks, one
thread count vs another) have the same losses and gradients up to rounding, but not the same weights
after AdamW steps: Adam divides by sqrt(v), so an entry whose gradient is ~0 moves on its rounding noise
by as much as an entry with a real gradient. What bounds the gap is the size of one Adam update.
"""

from __future__ import annotations

import math

from sea_convert.trainer_base import lr_factor


def adam_update_bound(t: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """max |m_hat / sqrt(v_hat)| at step t (1-based), over every gradient sequence.

    By Cauchy-Schwarz, |m_t| <= (1 - b1) sqrt(S_t / (1 - b2)) sqrt(v_t) with S_t = sum_{k<t} (b1^2/b2)^k;
    the bias corrections multiply it by sqrt(1 - b2^t) / (1 - b1^t). It is 1 at t = 1 (m_hat/sqrt(v_hat) =
    g/|g|) and grows slowly (1.105 at t = 16, 2.24 at t = 100 for the default betas)."""
    b1, b2 = betas
    s = sum((b1 * b1 / b2) ** k for k in range(t))
    return (1 - b1) * math.sqrt(s / (1 - b2)) * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)


def adamw_weight_gap_bound(lr: float, warmup: int, total: int, steps: int | None = None) -> float:
    """The largest |w1 - w2| of one entry after `steps` AdamW steps of two runs from the same start, on the
    project's schedule (sea_convert.trainer_base.lr_factor): each step moves each run's entry by at most
    lr_t * adam_update_bound(t), so the two differ by at most twice the sum. Weight decay multiplies
    both by (1 - lr_t * wd), which only shrinks the gap; gradient clipping does not change m/sqrt(v)."""
    steps = total if steps is None else steps
    return 2 * sum(lr * lr_factor(s, warmup, total) * adam_update_bound(s + 1) for s in range(steps))
