"""Text in, token windows out: training windows and a held-out tail that never overlap.

All text goes through `datasets`: a local file through its `text` builder, a hub dataset by name.
Tokens form one 1-D stream (documents joined by EOS, each optionally starting with BOS), then
training takes fixed, non-overlapping windows from the front and evaluation takes the tail.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .recipe import DataConfig, RecipeError, TextSource

# Documents tokenized per tokenizer call: the fast tokenizer spreads a batch over CPU cores.
_TOKENIZE_BATCH = 256


def load_texts(src: TextSource) -> Iterator[str]:
    """Yield the documents of a text source, at most `src.max_documents` of them.

    Local file: read through datasets' `text` builder with `sample_by="document"`, so the whole
    file is one document. Paragraphs are not documents in the files at hand (a novel's paragraphs,
    a dictionary entry's headword and body): an EOS between every paragraph would be 2-7% of the
    tokens and text the model never sees. Streaming avoids an Arrow copy of the file in the cache.

    Hub dataset: `load_dataset(src.hub, src.config, split=src.split, streaming=src.streaming)`,
    yielding `src.text_field` of each row; empty rows (wikitext has many) are skipped. This path
    needs a network and is not exercised by the offline tests.
    """
    import datasets  # slow import; only callers that read text pay for it

    if src.path is not None:
        ds = datasets.load_dataset("text", data_files=str(src.path), sample_by="document", split="train", streaming=True)
        field = "text"
    else:
        ds = datasets.load_dataset(src.hub, src.config, split=src.split, streaming=src.streaming)
        field = src.text_field
    n = 0
    for i, row in enumerate(ds):
        if i == 0 and field not in row:
            raise RecipeError(
                f"text_field {field!r} is not a column of {src.describe()}; its columns are {sorted(row)}"
            )
        text = row[field]
        if not text or not text.strip():
            continue
        yield text
        n += 1
        if src.max_documents is not None and n >= src.max_documents:
            return


def tokenize_texts(texts: Iterable[str], tokenizer, add_bos: bool, max_tokens: int | None = None) -> torch.LongTensor:
    """One 1-D token stream: [BOS] doc EOS [BOS] doc EOS ... ; stops once `max_tokens` are in hand.

    Documents are joined with the tokenizer's EOS (nothing after the last one). When BOS and EOS
    are the same token (the SmolLM2 GGUF tokenizer uses <|im_start|> for both) the separator is
    written once, not twice.
    """
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id
    parts: list[list[int]] = []
    total = 0

    def flush(batch: list[str]) -> None:
        nonlocal total
        # verbose=False: documents are longer than model_max_length on purpose (they get windowed).
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            piece: list[int] = []
            if parts and eos is not None:
                piece.append(eos)
            if bos is not None and not (piece and piece[-1] == bos):
                piece.append(bos)
            piece.extend(ids)
            parts.append(piece)
            total += len(piece)

    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _TOKENIZE_BATCH:
            flush(batch)
            batch = []
            if max_tokens is not None and total >= max_tokens:
                break
    else:
        if batch:
            flush(batch)
    stream = torch.tensor([t for p in parts for t in p], dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


@dataclass
class Splits:
    """Training windows and held-out tokens, with where each came from (ranges are [start, end)
    token offsets into the named source's token stream)."""

    train: torch.LongTensor  # (n_windows, seq_len)
    held_out: torch.LongTensor  # 1-D
    train_source: str
    held_out_source: str
    train_token_range: tuple[int, int]
    held_out_token_range: tuple[int, int]

    def describe(self) -> str:
        return (
            f"train: {self.train.shape[0]} windows x {self.train.shape[1]} tokens from {self.train_source} "
            f"tokens [{self.train_token_range[0]}, {self.train_token_range[1]}); "
            f"held out: {self.held_out.numel()} tokens from {self.held_out_source} "
            f"tokens [{self.held_out_token_range[0]}, {self.held_out_token_range[1]})"
        )


def build_splits(cfg: DataConfig, tokenizer) -> Splits:
    """Tokenize the recipe's data and cut it into training windows and a held-out tail.

    Same source (held_out unset or equal to train): the stream read is capped at
    max_train_tokens + held_out_tokens; its last held_out_tokens tokens are held out and the
    training windows come only from before them. Separate source: training reads the train
    source (capped by max_train_tokens), held-out is the last held_out_tokens of the other source.
    """
    seq, n_held = cfg.seq_len, cfg.held_out_tokens
    same = cfg.held_out is None or cfg.held_out == cfg.train
    cap = cfg.max_train_tokens + n_held if (same and cfg.max_train_tokens is not None) else cfg.max_train_tokens
    stream = tokenize_texts(load_texts(cfg.train), tokenizer, cfg.add_bos, cap)

    if same:
        if stream.numel() < n_held + seq:
            raise RecipeError(
                f"data.train ({cfg.train.describe()}) has {stream.numel()} tokens: too few for "
                f"held_out_tokens ({n_held}) plus one training window of seq_len ({seq})"
            )
        held_start = stream.numel() - n_held
        held, held_src, train_part = stream[held_start:], cfg.train.describe(), stream[:held_start]
    else:
        if stream.numel() < seq:
            raise RecipeError(
                f"data.train ({cfg.train.describe()}) has {stream.numel()} tokens: too few for one "
                f"training window of seq_len ({seq})"
            )
        other = tokenize_texts(load_texts(cfg.held_out), tokenizer, cfg.add_bos)
        if other.numel() < n_held:
            raise RecipeError(
                f"data.held_out ({cfg.held_out.describe()}) has {other.numel()} tokens: fewer than "
                f"held_out_tokens ({n_held})"
            )
        held_start = other.numel() - n_held
        held, held_src, train_part = other[held_start:], cfg.held_out.describe(), stream

    n_windows = train_part.numel() // seq
    train = train_part[: n_windows * seq].reshape(n_windows, seq).clone()
    return Splits(
        train=train,
        held_out=held.clone(),
        train_source=cfg.train.describe(),
        held_out_source=held_src,
        train_token_range=(0, n_windows * seq),
        held_out_token_range=(held_start, held_start + n_held),
    )


def eval_windows(tokens: torch.LongTensor, ctx: int, max_windows: int | None = None) -> torch.LongTensor:
    """Non-overlapping (n, ctx) windows from the start of `tokens`, ragged end dropped; with
    max_windows, only the last max_windows of them (the tail of the text)."""
    n = tokens.numel() // ctx
    if n == 0:
        raise RecipeError(f"validate.perplexity.ctx: {tokens.numel()} held-out tokens make no window of ctx {ctx}")
    windows = tokens[: n * ctx].reshape(n, ctx)
    return windows[-max_windows:] if max_windows is not None else windows


class TrainBatches:
    """Endless, deterministic batches of training windows.

    Each epoch visits every window once in a permutation drawn from (seed, epoch), so the order
    depends on nothing but these two numbers and the state is just (epoch, position): a run
    resumed from `state_dict()` yields exactly the batches an uninterrupted run would.
    """

    def __init__(self, windows: torch.LongTensor, batch_size: int, seed: int = 0):
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise ValueError(f"need a non-empty (n_windows, seq_len) tensor, got shape {tuple(windows.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, epoch])  # independent stream per (seed, epoch)
        return torch.from_numpy(rng.permutation(self.windows.shape[0]))

    def next(self) -> torch.LongTensor:
        picked: list[torch.Tensor] = []
        need = self.batch_size
        while need:
            take = self._order[self.position : self.position + need]
            picked.append(take)
            need -= take.numel()
            self.position += take.numel()
            if self.position == self._order.numel():  # epoch done: next permutation
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return self.windows[torch.cat(picked)]

    __next__ = next

    def __iter__(self) -> "TrainBatches":
        return self

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "n_windows": self.windows.shape[0],
        }

    def load_state_dict(self, state: dict) -> None:
        # A different data set or seed would resume into a different order without any error.
        for key in ("seed", "batch_size", "n_windows"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"cannot resume batches: saved {key}={state[key]}, this run has {mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
