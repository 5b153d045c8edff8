"""sea_convert.data: loading through datasets, the token stream, train/held-out splits, batches."""

import json
from pathlib import Path

import pytest
import torch

from sea_convert import data
from sea_convert.data import TrainBatches, build_splits, eval_windows, load_texts, tokenize_texts
from sea_convert.recipe import DataConfig, TextSource

AUSTEN = Path("/work/shared/data/austen.txt")


def _write(tmp_path: Path, name: str, n_sentences: int) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    lines = [f"Sentence {i} says {words[i % 8]} and {words[(i * 3) % 8]}." for i in range(n_sentences)]
    path = tmp_path / name
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- loading -------------------------------------------------------------------------------------


def test_local_file_loads_through_datasets_as_one_document(tmp_path):
    path = _write(tmp_path, "t.txt", 20)
    docs = list(load_texts(TextSource(path=path)))
    assert docs == [path.read_text(encoding="utf-8")]


def test_austen_loads_through_datasets_unchanged():
    if not AUSTEN.is_file():
        pytest.skip("shared corpus missing")
    docs = list(load_texts(TextSource(path=AUSTEN)))
    assert len(docs) == 1 and docs[0] == AUSTEN.read_text(encoding="utf-8")


class _FakeHub:
    """Stands in for datasets.load_dataset on the hub path (no network in tests)."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return iter(self.rows)


def test_hub_source_reads_text_field_skips_empty_and_honours_max_documents(monkeypatch):
    import datasets

    fake = _FakeHub([{"body": "one"}, {"body": ""}, {"body": "two"}, {"body": "three"}])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    src = TextSource(hub="someone/corpus", config="v1", split="validation", text_field="body",
                     streaming=True, max_documents=2)
    assert list(load_texts(src)) == ["one", "two"]
    assert fake.calls == [(("someone/corpus", "v1"), {"split": "validation", "streaming": True})]


def test_missing_text_field_names_field_and_columns(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _FakeHub([{"content": "x", "url": "u"}]))
    with pytest.raises(ValueError, match=r"'text'.*\['content', 'url'\]"):
        list(load_texts(TextSource(hub="someone/corpus")))


# --- token stream --------------------------------------------------------------------------------


class _ToyTokenizer:
    """Characters as tokens; BOS and EOS distinct (unlike the SmolLM2 GGUF tokenizer)."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens, verbose):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_stream_layout_with_distinct_bos_eos():
    tok = _ToyTokenizer()
    assert tokenize_texts(["ab", "c"], tok, add_bos=True).tolist() == [1, 97, 98, 2, 1, 99]
    assert tokenize_texts(["ab", "c"], tok, add_bos=False).tolist() == [97, 98, 2, 99]


def test_stream_stops_early_at_max_tokens(monkeypatch):
    monkeypatch.setattr(data, "_TOKENIZE_BATCH", 2)
    seen = []

    def texts():
        for i in range(100):
            seen.append(i)
            yield "xyz"

    out = tokenize_texts(texts(), _ToyTokenizer(), add_bos=False, max_tokens=9)
    assert out.tolist() == [120, 121, 122, 2, 120, 121, 122, 2, 120]
    assert len(seen) <= 4  # read in batches of 2 documents and stopped after the 3rd and 4th


def test_stream_with_smollm2_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    a, b = "Hello there.", "General Kenobi!"
    ia, ib = (tok(t, add_special_tokens=False)["input_ids"] for t in (a, b))
    assert tok.bos_token_id is not None and tok.bos_token_id == tok.eos_token_id  # the GGUF's choice
    # BOS == EOS: one separator token between documents, not two.
    assert tokenize_texts([a, b], tok, add_bos=True).tolist() == [tok.bos_token_id] + ia + [tok.eos_token_id] + ib
    assert tokenize_texts([a, b], tok, add_bos=False).tolist() == ia + [tok.eos_token_id] + ib


# --- splits --------------------------------------------------------------------------------------


def _check_windows_are_the_stream(splits, stream):
    """Windows are consecutive non-overlapping slices of the stream, ending before the held-out range."""
    start, end = splits.train_token_range
    n, seq = splits.train.shape
    assert start == 0 and end == n * seq
    for i in range(n):
        assert torch.equal(splits.train[i], stream[i * seq : (i + 1) * seq])


def test_same_source_tail_is_held_out_and_never_trained_on(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path = _write(tmp_path, "t.txt", 300)
    cfg = DataConfig(train=TextSource(path=path), seq_len=64, held_out_tokens=200)
    stream = tokenize_texts(load_texts(cfg.train), tok, add_bos=True)
    s = build_splits(cfg, tok)
    _check_windows_are_the_stream(s, stream)
    h0, h1 = s.held_out_token_range
    assert (h0, h1) == (stream.numel() - 200, stream.numel())
    assert torch.equal(s.held_out, stream[h0:h1])
    assert s.train_token_range[1] <= h0  # index ranges do not intersect
    assert s.train.shape[0] == h0 // 64  # every whole window before the held-out tail is used
    assert s.train_source == s.held_out_source == str(path)
    # held_out naming the same source as train means the same thing as leaving it out
    s2 = build_splits(cfg.model_copy(update={"held_out": TextSource(path=path)}), tok)
    assert torch.equal(s2.train, s.train) and torch.equal(s2.held_out, s.held_out)


def test_same_source_with_cap_reads_cap_plus_held_out(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path = _write(tmp_path, "t.txt", 300)
    cfg = DataConfig(train=TextSource(path=path), seq_len=32, held_out_tokens=100, max_train_tokens=500)
    stream = tokenize_texts(load_texts(cfg.train), tok, add_bos=True)
    s = build_splits(cfg, tok)
    assert s.held_out_token_range == (500, 600)
    assert torch.equal(s.held_out, stream[500:600])
    assert s.train.shape == (500 // 32, 32)
    _check_windows_are_the_stream(s, stream)


def test_separate_held_out_source_uses_its_tail(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    train_path, held_path = _write(tmp_path, "train.txt", 200), _write(tmp_path, "held.txt", 80)
    cfg = DataConfig(train=TextSource(path=train_path), held_out=TextSource(path=held_path),
                     seq_len=32, held_out_tokens=100, max_train_tokens=320)
    train_stream = tokenize_texts(load_texts(cfg.train), tok, add_bos=True)
    held_stream = tokenize_texts(load_texts(cfg.held_out), tok, add_bos=True)
    s = build_splits(cfg, tok)
    assert s.train.shape == (10, 32)  # capped at max_train_tokens
    _check_windows_are_the_stream(s, train_stream)
    assert torch.equal(s.held_out, held_stream[-100:])
    assert s.held_out_token_range == (held_stream.numel() - 100, held_stream.numel())
    assert s.held_out_source == str(held_path) != s.train_source


def test_austen_splits(smollm2_tokenizer):
    if not AUSTEN.is_file():
        pytest.skip("shared corpus missing")
    cfg = DataConfig(train=TextSource(path=AUSTEN), seq_len=1024, held_out_tokens=65536, max_train_tokens=100_000)
    s = build_splits(cfg, smollm2_tokenizer)
    assert s.train.shape == (100_000 // 1024, 1024)
    assert s.held_out.numel() == 65536
    assert s.train_token_range[1] <= s.held_out_token_range[0] == 100_000
    assert s.train[0, 0].item() == smollm2_tokenizer.bos_token_id
    assert "Dashwood" in smollm2_tokenizer.decode(s.train[0].tolist())


def test_too_short_text_errors_name_the_field(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    short, long = _write(tmp_path, "short.txt", 1), _write(tmp_path, "long.txt", 300)
    with pytest.raises(ValueError, match=r"data\.train .*too few"):
        build_splits(DataConfig(train=TextSource(path=short), seq_len=16, held_out_tokens=16), tok)
    with pytest.raises(ValueError, match=r"data\.train .*too few"):
        build_splits(DataConfig(train=TextSource(path=short), held_out=TextSource(path=long), seq_len=1024), tok)
    with pytest.raises(ValueError, match=r"data\.held_out .*fewer than held_out_tokens"):
        build_splits(DataConfig(train=TextSource(path=long), held_out=TextSource(path=short), seq_len=16,
                                held_out_tokens=1000), tok)


# --- evaluation windows --------------------------------------------------------------------------


def test_eval_windows_drop_ragged_end_and_keep_the_tail():
    t = torch.arange(10)
    assert eval_windows(t, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert eval_windows(t, 3, max_windows=2).tolist() == [[3, 4, 5], [6, 7, 8]]
    assert eval_windows(t, 3, max_windows=50).shape == (3, 3)
    with pytest.raises(ValueError, match="no window"):
        eval_windows(t, 11)


# --- training batches ----------------------------------------------------------------------------


def _windows(n: int, seq: int = 4) -> torch.Tensor:
    return torch.arange(n)[:, None].repeat(1, seq)  # row i is all i: the row id


def _ids(batches: TrainBatches, k: int) -> list[int]:
    return [int(r) for _ in range(k) for r in batches.next()[:, 0]]


def test_batches_deterministic_and_each_epoch_a_permutation():
    ids = _ids(TrainBatches(_windows(10), batch_size=3, seed=7), 10)  # 30 draws: 3 epochs
    assert ids == _ids(TrainBatches(_windows(10), batch_size=3, seed=7), 10)
    assert ids != _ids(TrainBatches(_windows(10), batch_size=3, seed=8), 10)
    epochs = [ids[i : i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]  # a new order per epoch
    assert TrainBatches(_windows(10), 3, 7).next().shape == (3, 4)


def test_batches_resume_matches_uninterrupted_run():
    full = _ids(TrainBatches(_windows(10), batch_size=4, seed=1), 12)
    first = TrainBatches(_windows(10), batch_size=4, seed=1)
    head = _ids(first, 3)  # 12 draws: stops mid-epoch, and later batches straddle epoch ends
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = TrainBatches(_windows(10), batch_size=4, seed=1)
    resumed.load_state_dict(state)
    assert first.state_dict()["epoch"] == 1 and first.state_dict()["position"] == 2
    assert head + _ids(resumed, 9) == full
    with pytest.raises(ValueError, match="n_windows"):
        TrainBatches(_windows(11), batch_size=4, seed=1).load_state_dict(state)
