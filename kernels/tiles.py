"""Tile sizes of the Triton kernels: tl.arange wants powers of two, tl.dot at least 16 rows."""

from __future__ import annotations

import triton

MIN_ROWS = 16  # tl.dot needs at least 16 rows (and columns)


def pow2(n: int, least: int = MIN_ROWS) -> int:
    """The smallest power of two that holds n, and at least `least`."""
    return max(least, triton.next_power_of_2(n))
