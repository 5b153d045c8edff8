"""Passkey retrieval: a random passkey hidden at a depth of filler text, and whether the model reads it back.

The test of Mohtashami & Jaggi (Landmark Attention, 2023) that long-context and sparse-attention work reports
beside RULER: the filler says nothing, so only attention to the one line that holds the key can answer. A
prompt of about `length` tokens is

    <instruction> <filler ...> <the pass key line> <filler ...> What is the pass key? The pass key is

with the key line after `depth` (0 to 1) of the filler. The answer counts as read back when greedy decoding
would produce the key's digits: every answer token is the model's argmax at its position given the prompt and
the tokens before it. Where every row's attention depends only on the rows before it (dense; SEA per query, or in
block mode with block rows, whose selection is made when a query block opens), one forward pass over prompt +
answer shows that (teacher forcing; the same verdict as generating, at the cost of one prefill). Elsewhere (the
oracle; SEA in block mode with token rows, which pools the estimate rows of the whole query block, answer rows
after a row's own included) the answer is decoded token by token, a full pass over each prefix. (For token rows
that is the full recompute, which the cached decoder can leave once a query block's later rows re-pool an earlier
row's selection: docs/decoding.md.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sea_convert.integration import attention_mode, attention_modules

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeySample:
    ids: torch.Tensor  # (n,) prompt and answer tokens
    answer_start: int  # the answer's first token
    length: int  # the target prompt length it was made for
    depth: float  # where the key line sits in the filler, 0 .. 1
    key: str


def make_sample(tokenizer, length: int, depth: float, key: str, add_bos: bool = True) -> PasskeySample:
    """A prompt of about `length` tokens (never more) with the key line after `depth` of the filler, and its answer."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head = ([tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []) + encode(INSTRUCTION)
    key_ids, question, answer = encode(" " + KEY_LINE.format(key=key)), encode(" " + QUESTION), encode(" " + key)
    filler = encode(" " + FILLER)
    room = length - len(head) - len(key_ids) - len(question)
    if room < len(filler):
        raise ValueError(f"length {length} leaves no room for filler around the key (needs at least "
                         f"{len(head) + len(key_ids) + len(question) + len(filler)} tokens)")
    repeats = room // len(filler)
    before = round(depth * repeats)
    prompt = head + filler * before + key_ids + filler * (repeats - before) + question
    return PasskeySample(torch.tensor(prompt + answer), len(prompt), length, depth, key)


def make_grid(tokenizer, lengths: list[int], depths: list[float], per_cell: int, seed: int = 0,
              add_bos: bool = True) -> list[PasskeySample]:
    """per_cell samples at every (length, depth), each with its own random 5-digit key."""
    rng = random.Random(seed)
    return [make_sample(tokenizer, n, depth, str(rng.randint(10000, 99999)), add_bos)
            for n in lengths for depth in depths for _ in range(per_cell)]


def rows_see_only_the_past(model, mode: str) -> bool:
    """Whether, in attention `mode`, each row's output depends only on the rows up to it (so one pass over prompt +
    answer gives what decoding would)."""
    if mode == "dense":
        return True
    if mode == "oracle":
        return False
    cfg = attention_modules(model)[0].sea_config
    return cfg.mode != "block" or cfg.predictor_rows == "block"


@torch.no_grad()
def reads_back(model, sample: PasskeySample, mode: str) -> bool:
    """Whether greedy decoding in attention `mode` would produce the sample's answer (see the module docstring).

    The oracle, and SEA in block mode with token rows, are decoded token by token instead (a full pass per answer
    token): both pool a query block's rows, so rows after the answer's first, in the same block, would change the
    blocks that first row reads."""
    device = next(model.parameters()).device
    ids = sample.ids[None].to(device)
    answer = sample.ids[sample.answer_start :]
    with attention_mode(model, mode):
        if rows_see_only_the_past(model, mode):
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits[0]
            return bool(torch.equal(logits[sample.answer_start - 1 :].argmax(-1).cpu(), answer))
        prefix = ids[:, : sample.answer_start]
        for want in answer.tolist():
            got = int(model(input_ids=prefix, use_cache=False).logits[0, -1].argmax())
            if got != want:
                return False
            prefix = torch.cat([prefix, prefix.new_tensor([[got]])], dim=1)
        return True


def passkey_accuracy(model, samples: list[PasskeySample], modes: tuple[str, ...] = ("dense", "sea", "oracle"),
                     progress=None) -> dict:
    """{mode: {length: {depth: accuracy}}} and each mode's mean over the grid, under "mean"."""
    out: dict = {}
    for mode in modes:
        cells: dict = {}
        for sample in samples:
            cells.setdefault(sample.length, {}).setdefault(sample.depth, []).append(reads_back(model, sample, mode))
            if progress is not None:
                progress(mode, sample)
        grid = {n: {d: sum(hits) / len(hits) for d, hits in sorted(row.items())} for n, row in sorted(cells.items())}
        values = [a for row in grid.values() for a in row.values()]
        out[mode] = {"grid": grid, "mean": sum(values) / len(values)}
    return out


def plot_heatmap(results: dict, path, title: str = "passkey retrieval") -> None:
    """One depth x length heat map per mode (green: read back), side by side, as needle-in-a-haystack plots are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in results if isinstance(results[m], dict) and "grid" in results[m]]
    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        # lengths and depths as numbers: results read back from JSON have them as text
        grid = {int(n): {float(d): a for d, a in row.items()} for n, row in results[mode]["grid"].items()}
        lengths = sorted(grid)
        depths = sorted(next(iter(grid.values())))
        image = [[grid[n][d] for n in lengths] for d in depths]
        ax.imshow(image, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(f"{mode}: {results[mode]['mean']:.0%}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
