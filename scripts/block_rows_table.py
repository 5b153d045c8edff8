"""Print the markdown table of an attention_bench.py JSON run with block rows (docs/benchmarks.md's tables).

    python3 scripts/block_rows_table.py docs/results/attention_block_rows_h100_run3_2026-12-06.json
"""

from __future__ import annotations

import json
import sys

KEY = "2048 keys block-rows"


def ms(row: dict, name: str) -> float | None:
    entry = row.get(f"{name}[{KEY}]") if not name.startswith("dense") else row.get(name)
    return None if entry is None else entry["ms"]


def main(path: str) -> None:
    rows = json.load(open(path))["rows"]
    print(f"device: {rows[0]['device']}")
    print("| T | dense fwd ms | block rows fwd | speed-up | CUDA graph | speed-up | kernel alone | dense fwd+bwd | block rows fwd+bwd | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense, eager, graph, kernel = ms(r, "dense_fwd"), ms(r, "sea_fwd"), ms(r, "sea_fwd_graph"), ms(r, "kernel")
        dense_b, sea_b = ms(r, "dense_fwdbwd"), ms(r, "sea_fwdbwd")
        cell = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
        print(f"| {r['T'] // 1024}k | {cell(dense)} | {cell(eager)} | {ratio(dense, eager)} | {cell(graph)} | "
              f"**{ratio(dense, graph)}** | {cell(kernel)} | {cell(dense_b)} | {cell(sea_b)} | {ratio(dense_b, sea_b)} |")


if __name__ == "__main__":
    main(sys.argv[1])
