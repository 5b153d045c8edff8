"""Two runs' stage-A loss histories side by side (service_e2e.py, stage_a_paths.py)."""

from __future__ import annotations


def history_gaps(a: list[dict], b: list[dict], split_at: int | None = None) -> dict:
    """Relative loss gaps step by step between two stage-A histories, before and after step `split_at` (a kill)."""
    gaps = [(x.get("step", i + 1), abs(x["loss"] - y["loss"]) / abs(y["loss"])) for i, (x, y) in enumerate(zip(a, b))]
    parts = {"all": gaps} if split_at is None else {f"steps <= {split_at}": [g for g in gaps if g[0] <= split_at],
                                                    f"steps > {split_at}": [g for g in gaps if g[0] > split_at]}
    out = {}
    for name, part in parts.items():
        values = sorted(v for _, v in part)
        if values:
            worst = max(part, key=lambda g: g[1])
            first = next((step for step, v in part if v > 0), None)
            out[name] = {"steps": len(values), "max": worst[1], "at_step": worst[0], "median": values[len(values) // 2],
                         "first_differing_step": first}
    return out
