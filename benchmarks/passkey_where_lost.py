"""Where a converted model loses the pass key: for each layer, does the answer's query block keep the key's
block, in SEA's selection and in the oracle's at the same budget, and how much of the teacher's attention lands
on the key there. CPU is enough (1k-2k prompts).

    python3 benchmarks/passkey_where_lost.py outputs/smollm2-135m-sea --lengths 1024 --depths 0.25 0.5 0.75 \\
        --json docs/results/passkey_where_lost.json

Per layer, averaged over samples and KV heads: `teacher_mass` (the share of the answering rows' attention on the
key line, the largest of a KV head's query heads), `sea_kept` and `oracle_kept` (how often the answering query
block's list holds a block of the key line), `sea_rank` (the key's best block's rank in SEA's scores for that
query block, 0 = first; the budget keeps ranks below its block count), and `pooled_rank`, the same rank under a
pooled selector (the answering rows' mean query against each key block's mean key: MoBA's and Quest's family), to
tell a budget that is too small from a predictor that does not see the key; the same pooled rank from the whole
query block's mean query (`block_pooled_rank`) and from the window a block row is made from, the block_size rows
up to the block's first (`opening_pooled_rank`, blocks before the query block only); `answer_offset`, the first
answering row's place in its query block; and each score's Spearman correlation
with the teacher's attention mass over the query block's causal key blocks. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script from anywhere

from content_term_probe import block_means  # noqa: E402  (beside this script)
from kernels import dispatch  # noqa: E402
from kernels.reference_block_rows import opening_means  # noqa: E402
from kernels.reference_teacher_target import block_attention_mass  # noqa: E402
from sea_convert.attention.select import block_budget, block_selection_scores, oracle_select, select  # noqa: E402
from sea_convert.checkpoint import load  # noqa: E402
from sea_convert.integration import attention_modules, capture_attention, predictors  # noqa: E402
from sea_convert.passkey import KEY_LINE, make_sample  # noqa: E402


def key_span(tokenizer, sample) -> range:
    """The key line's token positions in the prompt."""
    line = tokenizer(" " + KEY_LINE.format(key=sample.key), add_special_tokens=False)["input_ids"]
    ids = sample.ids.tolist()
    for start in range(len(ids) - len(line) + 1):
        if ids[start : start + len(line)] == line:
            return range(start, start + len(line))
    raise ValueError("the key line is not in the prompt")


@torch.no_grad()
def diagnose(model, tokenizer, sample) -> list[dict]:
    preds = predictors(model)
    span = key_span(tokenizer, sample)
    ids = sample.ids[None]
    with capture_attention(model) as cap:
        model(input_ids=ids, use_cache=False)
    T = ids.shape[1]
    answering = torch.arange(sample.answer_start - 1, T - 1)  # the rows that predict the answer's tokens
    rows = []
    for layer, pred in enumerate(preds):
        c, cfg = cap[layer], attention_modules(model)[layer].sea_config
        ops = dispatch.ops(cfg.backend, ids.device)
        Hq, Hkv = c.q.shape[1], c.k.shape[1]
        G, bs = Hq // Hkv, cfg.block_size
        key_blocks = sorted({p // bs for p in span})
        qb = int(answering[0]) // bs  # the query block of the first answering row
        probs = pred(c.q, c.k, c.v, c.scale, ops).log_probs.exp()
        sea = select(probs, cfg, Hkv, ops, seq_len=T)
        oracle = oracle_select(c.q, c.k, c.scale, cfg)
        scores = block_selection_scores(probs, cfg, Hkv, ops)[0, :, qb]  # (Hkv, NKB): what `select` ranks
        later = torch.arange(T)[None, :] > answering[:, None]  # (rows, T): the keys after each answering row
        att = torch.softmax(((c.q[0, :, answering].float() @ c.k[0].float().repeat_interleave(G, 0).transpose(-1, -2))
                             * c.scale).masked_fill(later, float("-inf")), -1)  # (Hq, rows, T)
        on_key = att[:, :, list(span)].sum(-1).mean(-1).view(Hkv, G).amax(-1)  # (Hkv,)

        def kept(s):
            listed = s.block_index[0, :, qb, :]
            n = s.block_count[0, :, qb]
            return [bool(any(b in key_blocks for b in listed[h, : n[h]].tolist())) for h in range(Hkv)]

        def best_rank(block_scores_kv: torch.Tensor) -> list[int]:
            order = block_scores_kv.argsort(-1, descending=True)
            return [min(int((order[h] == b).nonzero()[0]) for b in key_blocks) for h in range(Hkv)]

        rank = best_rank(scores)
        # how well each score orders the key blocks as the teacher's attention mass does (Spearman over the causal
        # blocks): position alone (sink, recent blocks) already earns some of it
        mass = block_attention_mass(c.q, c.k, c.scale, bs)[0, :, qb, : qb + 1]
        # for comparison, a pooled selector (MoBA's, Quest's family): the answering rows' mean query against each
        # key block's mean key, summed over the group's query heads, causal blocks only
        k_means = block_means(c.k, bs)[0]  # (Hkv, NKB, d)

        def pooled_scores(q_mean: torch.Tensor, causal_blocks: int) -> torch.Tensor:
            """A mean query per query head (Hq, d) against each key block's mean key, summed over the group's heads."""
            s = torch.einsum("hgd,hjd->hgj", q_mean.view(Hkv, G, -1), k_means).sum(1)
            s[:, causal_blocks:] = float("-inf")
            return s

        pooled = pooled_scores(c.q[0, :, answering].float().mean(1), qb + 1)
        # what a selection made per query block could read: the whole block's rows (a prefill-only choice, rows
        # see later rows' queries), or the window block rows read, the bs rows up to the block's first (causal)
        whole_block = pooled_scores(block_means(c.q, bs)[0, :, qb], qb + 1)
        opening = pooled_scores(opening_means(c.q, bs)[0, :, qb], qb)

        def spearman(a: torch.Tensor, b: torch.Tensor) -> list[float]:
            ra, rb = (x.argsort(-1).argsort(-1).float() for x in (a, b))
            ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
            return ((ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)).tolist()
        rows.append({"layer": layer, "teacher_mass": on_key.tolist(), "sea_kept": kept(sea), "oracle_kept": kept(oracle),
                     "sea_rank": rank, "pooled_rank": best_rank(pooled),
                     "block_pooled_rank": best_rank(whole_block), "opening_pooled_rank": best_rank(opening),
                     "answer_offset": [int(answering[0]) - qb * bs],
                     "sea_spearman": spearman(scores[:, : qb + 1], mass), "pooled_spearman": spearman(pooled[:, : qb + 1], mass),
                     "budget_blocks": int(block_budget(cfg).bound(qb + 1)), "query_block": qb,
                     "key_blocks": key_blocks})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--per-cell", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    model, tokenizer = load(a.checkpoint)
    model.eval()
    samples = [make_sample(tokenizer, n, d, str(10000 + 7919 * i % 90000)) for n in a.lengths for d in a.depths
               for i in range(a.per_cell)]
    per_sample = [diagnose(model, tokenizer, s) for s in samples]
    layers = len(per_sample[0])

    def mean(key: str, layer: int) -> float:
        vals = [float(v) for rows in per_sample for v in rows[layer][key]]
        return sum(vals) / len(vals)

    table = [{"layer": i, **{k: mean(k, i) for k in ("teacher_mass", "sea_kept", "oracle_kept", "sea_rank", "pooled_rank", "block_pooled_rank", "opening_pooled_rank", "answer_offset", "sea_spearman", "pooled_spearman")},
              "budget_blocks": per_sample[0][i]["budget_blocks"]} for i in range(layers)]
    print(f"{a.checkpoint}: {len(samples)} prompts ({a.lengths} tokens, depths {a.depths}); per layer, mean over "
          "prompts and KV heads")
    print("layer | teacher mass on the key | SEA keeps the key block | oracle keeps it | SEA's rank of it (budget) "
          "| pooled q.mean(k)'s rank: answering rows, whole block, opening window "
          "| Spearman with the teacher's block mass: SEA, pooled")
    for r in table:
        print(f"{r['layer']:5d} | {r['teacher_mass']:23.3f} | {r['sea_kept']:23.2f} | {r['oracle_kept']:15.2f} | "
              f"{r['sea_rank']:6.1f} ({r['budget_blocks']}) | {r['pooled_rank']:6.1f} {r['block_pooled_rank']:6.1f} "
              f"{r['opening_pooled_rank']:6.1f} | "
              f"{r['sea_spearman']:5.2f} {r['pooled_spearman']:5.2f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"checkpoint": str(a.checkpoint), "lengths": a.lengths, "depths": a.depths,
                                      "per_cell": a.per_cell, "layers": table, "samples": per_sample}, indent=1))


if __name__ == "__main__":
    main()
