"""MMLU loader and prompt: local files through the hub's code path, ids, caps, bad input, answer tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loki.data.mmlu import LETTERS, answer_token_id, letter_token_ids, load_mmlu, mc_messages, mc_prompt_ids
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
