"""Render the quality sweep's JSON (one file or several calls' files) as a markdown table and a PNG curve.

    python benchmarks/quality_report.py docs/results/quality_*.json --table docs/results/quality_table.md \
        --png docs/results/quality_curve.png [--passkey-png docs/results/passkey.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere


def load_rows(paths: list[Path]) -> tuple[list[dict], str]:
    rows, device = [], ""
    for p in paths:
        data = json.loads(p.read_text())
        device = data.get("device", device)
        rows += data["rows"]
    return rows, device


def _budget(row: dict, e: dict) -> str:
    return f"k={e['k']} per query" if row["mode"] == "per_query" else f"{e['block_keys']} keys/head"


def table(rows: list[dict]) -> str:
    control = any("dense_adapted" in r for r in rows)  # the column only where some row measured it
    out = [
        "| setting | ctx | mode | budget | stages (steps) | teacher ppl | oracle ppl (x) | SEA ppl (x) | SEA density |"
        + (" dense + stage-B adapters (x) |" if control else "") + " GPU-min |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if control else "") + "---|",
    ]
    for r in rows:
        e = r["main"]
        stages = ", ".join(f"{k.upper()} {v['steps']}" for k, v in sorted(r["stages"].items())) or "none"
        oracle = f"{e['oracle_ppl']:.3f} (x{e['oracle_ratio']:.4f})" if "oracle_ppl" in e else "-"
        d = r.get("dense_adapted")
        adapted = (f" {d['ppl']:.3f} (x{d['ratio']:.4f}) |" if d else " - |") if control else ""
        out.append(
            f"| {r['name']} | {r['ctx']} | {r['mode']} | {_budget(r, e)} | {stages} | {r['teacher_ppl']:.3f} | {oracle} |"
            f" {e['sea_ppl']:.3f} (x{e['sea_ratio']:.4f}) | {e['density']:.3f} |{adapted} {r['gpu_minutes_total']:.2f} |"
        )
    return "\n".join(out) + "\n"


def curve_table(rows: list[dict]) -> str:
    out = ["| setting | budget | SEA density | SEA x teacher | oracle density | oracle x teacher |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] != "block":
            continue
        for e in sorted([r["main"], *r["curve"]], key=lambda e: e["block_keys"]):
            o = (f"{e['oracle_density']:.3f} | {e['oracle_ratio']:.4f}") if "oracle_ppl" in e else "- | -"
            out.append(f"| {r['name']} | {e['block_keys']} | {e['density']:.3f} | {e['sea_ratio']:.4f} | {o} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_ctx: dict[int, list[dict]] = {}
    for r in rows:
        if r["mode"] == "block" and "mmlu" not in r:  # an MMLU row re-evaluates another row's model
            by_ctx.setdefault(r["ctx"], []).append(r)
    fig, axes = plt.subplots(1, len(by_ctx), figsize=(6.5 * len(by_ctx), 4.8), squeeze=False)
    for ax, (ctx, rs) in zip(axes[0], sorted(by_ctx.items())):
        oracle_pts = {}
        for r in rs:
            pts = sorted([r["main"], *r["curve"]], key=lambda e: e["density"])
            ax.plot([e["density"] for e in pts], [e["sea_ratio"] for e in pts], "o-", label=f"SEA {r['name']}")
            for e in pts:
                if "oracle_ppl" in e:
                    oracle_pts[e["block_keys"]] = (e["oracle_density"], e["oracle_ratio"])
        if oracle_pts:
            o = sorted(oracle_pts.values())
            ax.plot([d for d, _ in o], [x for _, x in o], "k--s", label="oracle (true top blocks)")
        per_query = [r for r in rows if r["mode"] == "per_query" and r["ctx"] == ctx]
        for r in per_query:
            ax.plot([r["main"]["density"]], [r["main"]["sea_ratio"]], "^", ms=9, label=f"SEA {r['name']}")
        ax.axvline(0.25, color="grey", lw=0.8, ls=":")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("attention density (kept / causal entries)")
        ax.set_ylabel("held-out perplexity / teacher's")
        ax.set_title(f"SmolLM2-135M, ctx {ctx} ({device})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def content_table(rows: list[dict]) -> str:
    """SEA with a content term in its block selection (quality_sweep.content_rows), against the row's own SEA."""
    out = ["| setting | content keys | weight | SEA x teacher | density | pass key |", "|---|---|---|---|---|---|"]
    for r in rows:
        for c in r.get("content", []):
            pk = f"{c['passkey']['mean']:.3f}" if c.get("passkey") else "-"
            out.append(f"| {r['name']} | {c['keys']} | {c['weight']} | {c['sea_ratio']:.4f} | {c['density']:.3f} | {pk} |")
    return "\n".join(out) + "\n" if len(out) > 2 else ""


def ruler_table(rows: list[dict]) -> str:
    """RULER scores by task, mode and length (quality_sweep.ruler_rows; sweep_lanes merges a split block)."""
    out = ["| setting | task | mode | scores by length | samples |", "|---|---|---|---|---|"]
    for r in rows:
        for mode, cell in r.get("ruler", {}).items():
            for task, scores in cell["scores"].items():
                by_len = ", ".join(f"{n}: {v:.2f}" for n, v in sorted(scores.items(), key=lambda kv: int(kv[0])))
                out.append(f"| {r['name']} | {task.removeprefix('sea_ruler_')} | {mode} | {by_len} | "
                           f"{cell['samples'].get(task, '-')} |")
    return "\n".join(out) + "\n" if len(out) > 2 else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--table", type=Path, required=True)
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--passkey-png", type=Path, default=None,
                    help="the pass-key heat maps of the (first) setting that ran the grid, teacher / SEA / oracle")
    args = ap.parse_args()
    rows, device = load_rows(args.inputs)
    text = "\n".join(t for t in (table(rows), curve_table(rows), content_table(rows), ruler_table(rows)) if t)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    plot(rows, args.png, device)
    if args.passkey_png is not None:
        from sea_convert.passkey import plot_heatmap

        row = next(r for r in rows if r.get("passkey"))
        plot_heatmap(row["passkey"], args.passkey_png, title=f"passkey retrieval, {row['name']} ({device})")
        print(f"wrote {args.passkey_png}")
    print(text)
    print(f"wrote {args.table} and {args.png}")


if __name__ == "__main__":
    main()
