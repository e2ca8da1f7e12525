"""Retention scoring (letter, cloze, graded) on stub models with known log-probabilities; lm-eval hook."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from loki.eval import run_retention
from loki.eval.retention import run_benchmark

MMLU = "tests/fixtures/mmlu/test.jsonl"


class SameNextTokenLogits(torch.nn.Module):
    """Every position predicts the same next-token logits `row` (a unigram LM): log-probs are known."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.row = torch.nn.Parameter(row.clone(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1).clone())


def test_letter_mode_matches_hand_computed_accuracy_and_logprob(chat_tokenizer):
    from loki.data.mmlu import letter_token_ids

    row = torch.zeros(len(chat_tokenizer))
    # letters A-D get logits log(1..4): renormalised over the four, p = [0.1, 0.2, 0.3, 0.4]; D always wins
    row[letter_token_ids(chat_tokenizer)] = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    answers = [json.loads(line)["answer"] for line in open(MMLU)]
    p = [0.1, 0.2, 0.3, 0.4]
    got = run_benchmark(SameNextTokenLogits(row), chat_tokenizer, "mm", {"path": MMLU, "mode": "letter", "per_subject": None})
    assert got["retention/mm/n"] == len(answers)
    assert got["retention/mm/acc"] == pytest.approx(sum(a == 3 for a in answers) / len(answers))
    assert got["retention/mm/logprob"] == pytest.approx(sum(math.log(p[a]) for a in answers) / len(answers))
    assert got["retention/mm/prob"] == pytest.approx(sum(p[a] for a in answers) / len(answers))


def test_cloze_mode_matches_hand_computed_scores(chat_tokenizer, tmp_path):
    rows = [
        {"question": "q one", "subject": "s", "choices": ["eee", "ab", "e", "xyzw"], "answer": 0},
        {"question": "q two", "subject": "s", "choices": ["zz", "eeeeee", "eeex", "b"], "answer": 3},
    ]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    e_id = chat_tokenizer("e", add_special_tokens=False)["input_ids"][0]
    vocab = len(chat_tokenizer)
    row = torch.zeros(vocab)
    row[e_id] = 5.0  # the byte tokenizer has one token per character: "e" costs 5 - Z, any other -Z
    z = math.log(math.exp(5.0) + vocab - 1)

    def choice_logprob(text):
        return sum((5.0 if ch == "e" else 0.0) - z for ch in text)

    sums = [[choice_logprob(c) for c in r["choices"]] for r in rows]
    # q one: "e" (1 char) has the best sum, "eee" the best per character; q two: "b" best sum, "eeeeee" per char
    assert [max(range(4), key=s.__getitem__) for s in sums] == [2, 3]
    gold = [s[r["answer"]] - math.log(sum(math.exp(v) for v in s)) for s, r in zip(sums, rows)]
    got = run_benchmark(SameNextTokenLogits(row), chat_tokenizer, "c", {"path": str(data), "mode": "cloze", "per_subject": None})
    assert got["retention/c/acc"] == pytest.approx(1 / 2)  # q two right, q one wrong
    assert got["retention/c/acc_norm"] == pytest.approx(1 / 2)  # q one right ("eee"), q two wrong
    assert got["retention/c/logprob"] == pytest.approx(sum(gold) / 2)
    assert got["retention/c/prob"] == pytest.approx(sum(math.exp(g) for g in gold) / 2)


def test_run_retention_on_a_tiny_model_and_missing_lm_eval(chat_tokenizer, monkeypatch, caplog):
    from tests.conftest import make_tiny_model

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if lm-eval were not installed
    cfg = {
        "batch_size": 4,
        "benchmarks": {"mmlu": {"path": MMLU, "mode": "letter", "per_subject": None, "max_samples": 4}},
        "lm_eval": {"tasks": ["hellaswag"]},
    }
    model = make_tiny_model(vocab=len(chat_tokenizer)).train()
    with caplog.at_level("WARNING"):
        got = run_retention(model, chat_tokenizer, cfg)
    assert set(got) == {f"retention/mmlu/{m}" for m in ("acc", "logprob", "prob", "n")}
    assert got["retention/mmlu/n"] == 4 and 0 <= got["retention/mmlu/acc"] <= 1
    assert "lm-evaluation-harness is not installed" in caplog.text
    assert model.training  # the caller's mode is restored


def test_batching_does_not_change_scores(chat_tokenizer):
    from tests.conftest import make_tiny_model

    model = make_tiny_model(vocab=len(chat_tokenizer))
    bench = {"path": MMLU, "mode": "cloze", "per_subject": None, "max_samples": 2}
    one = run_benchmark(model, chat_tokenizer, "b", bench, batch_size=1)
    many = run_benchmark(model, chat_tokenizer, "b", bench, batch_size=8)
    assert one == pytest.approx(many, rel=1e-4)
