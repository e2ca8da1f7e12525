"""Per-item retention values (`items=`): each benchmark's items reproduce its aggregate, on a tiny random
model and the fixture MMLU rows; asking for them changes no returned value."""

from __future__ import annotations

import math

import pytest

from loki.eval import run_retention

MMLU = "tests/fixtures/mmlu/test.jsonl"  # relative: the loaders find it from the repo root


def _cfg(text_file: str) -> dict:
    return {
        "batch_size": 3,  # 3 does not divide the 8 fixture rows: the last batch is short and reordered
        "benchmarks": {
            "letter": {"path": MMLU, "mode": "letter", "offset": 0, "per_subject": None},
            "cloze": {"path": MMLU, "mode": "cloze", "offset": 0, "per_subject": None, "max_samples": 4},
            "kl": {"path": MMLU, "mode": "kl", "offset": 2, "per_subject": None, "prompt": "letter", "positions": "all", "top_k": 16},
            "loss": {"mode": "lm_loss", "text_file": text_file},
            "qa": {"mode": "lm_loss", "path": MMLU, "offset": 0, "per_subject": None, "chat_template": False},
        },
    }


@pytest.fixture(scope="module")
def tokenizer():
    from loki.tokenizer import build_chat_tokenizer

    return build_chat_tokenizer()


@pytest.fixture(scope="module")
def measured(tokenizer, tmp_path_factory):
    from tests.conftest import make_tiny_model

    chat_tokenizer = tokenizer

    tmp = tmp_path_factory.mktemp("items")
    text = tmp / "held_out.txt"
    text.write_text("see the tree\n\na bee\nflew over it\n\nx\n\nthree is a number\n")  # "x": one token, nothing to predict
    cfg = _cfg(str(text))
    base = make_tiny_model(vocab=len(chat_tokenizer))
    tuned = make_tiny_model(vocab=len(chat_tokenizer), seed=1)
    before_items: dict = {}
    run_retention(base, chat_tokenizer, cfg, reference_dir=tmp, stage="before", items=before_items)
    plain = run_retention(tuned, chat_tokenizer, cfg, reference_dir=tmp, stage="after")
    items: dict = {}
    after = run_retention(tuned, chat_tokenizer, cfg, reference_dir=tmp, stage="after", items=items)
    return plain, after, items, before_items


def test_items_change_no_returned_value(measured):
    plain, after, items, _ = measured
    assert after == plain
    assert set(items) == {"letter", "cloze", "kl", "loss", "qa"}


def test_multiple_choice_items_reproduce_acc_and_logprob(measured):
    from loki.eval.retention import load_rows

    _, after, items, _ = measured
    for name in ("letter", "cloze"):
        rows = items[name]
        assert len(rows) == after[f"retention/{name}/n"]
        assert all(set(r) == {"id", "correct", "logprob"} for r in rows)
        assert sum(r["correct"] for r in rows) / len(rows) == after[f"retention/{name}/acc"]
        assert sum(r["logprob"] for r in rows) / len(rows) == pytest.approx(after[f"retention/{name}/logprob"], rel=1e-12)
        assert sum(math.exp(r["logprob"]) for r in rows) / len(rows) == pytest.approx(after[f"retention/{name}/prob"], rel=1e-12)
    fixture_ids = [r["id"] for r in load_rows({"path": MMLU, "offset": 0, "per_subject": None})]
    assert [r["id"] for r in items["letter"]] == fixture_ids  # the rows' own ids, in row order


def test_kl_items_are_the_per_prompt_values_whose_mean_is_kl(measured):
    _, after, items, before_items = measured
    rows = items["kl"]
    assert len(rows) == after["retention/kl/n"] == 6  # offset 2: rows 2-3 of three subjects
    assert sum(r["kl"] for r in rows) / len(rows) == after["retention/kl/kl"]  # the same sum, in the same order
    assert all(r["kl"] >= 0 for r in rows) and len({r["kl"] for r in rows}) > 1  # per prompt, not one repeated value
    assert before_items["kl"] == [{"kl": 0.0}] * 6  # the base against itself, by definition


def test_lm_loss_items_reproduce_the_token_weighted_mean(measured, tokenizer):
    _, after, items, before_items = measured
    for name in ("loss", "qa"):
        rows = items[name]
        assert len(rows) == after[f"retention/{name}/n"]
        assert sum(r["tokens"] for r in rows) == after[f"retention/{name}/tokens"]
        ratio = sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)
        assert ratio == pytest.approx(after[f"retention/{name}/lm_loss"], rel=1e-12)
        assert [r["tokens"] for r in rows] == [r["tokens"] for r in before_items[name]]  # same texts before and after
    # each scored text's own count, in the file's order (its tokens minus the unpredicted first one); the
    # one-token "x" predicts nothing and is left out, as the aggregate leaves it out
    assert len(tokenizer("x")["input_ids"]) == 1
    docs = ["see the tree", "a bee\nflew over it", "three is a number"]
    assert [r["tokens"] for r in items["loss"]] == [len(tokenizer(d)["input_ids"]) - 1 for d in docs]
