"""Chat SFT loader: assistant-only loss masks, skipped conversations, bad input, batching, the token cache
and its key, column pruning, too-long rows (truncate / drop), LLaMA-Factory-style packing, the typed config.

Single conversations go through `encode_batch` and packed rows through `pack_groups` + `ChatExamples`:
the functions the data module itself runs."""

from __future__ import annotations

import json

import pytest
import torch

import loki.data.chat as chat
import loki.data.chat.tokenise
from loki.data.chat import (
    IGNORE_INDEX,
    ChatDataConfig,
    ChatExamples,
    ChatSFTDataModule,
    assemble,
    collate_right_padded,
    encode_batch,
    hub_load_error,
    knapsack_packs,
    load_rows,
    pack_groups,
    split_budget,
    to_messages,
)
from loki.errors import LokiError
from loki.files import settings_digest

FIXTURES = "tests/fixtures"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Every data module here caches under this test's own directory (the default root is $LOKI_CACHE)."""
    monkeypatch.setenv("LOKI_CACHE", str(tmp_path / "cache"))

# A different layout from ChatML, without {% generation %} tags, that injects a default system prompt
# when there is none (as Qwen2.5's template does): the masks must still follow the assistant turns.
PLAIN_TEMPLATE = (
    "{%- if messages and messages[0]['role'] != 'system' -%}{{ '[SYS] You are helpful.<|im_end|>' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '### Reply:\\n' + m['content'] + '<|im_end|>\\n\\n' }}"
    "{%- else -%}{{ '### ' + m['role'] + ':\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Reply:\\n' }}{%- endif -%}"
)

MULTI_TURN = [
    {"from": "system", "value": "Score relatedness 1-7."},
    {"from": "human", "value": "first question"},
    {"from": "gpt", "value": "7"},
    {"from": "human", "value": "second question"},
    {"from": "gpt", "value": "an answer with several words"},
]


def encode_one(tokenizer, turns, system=None, max_length=None, too_long="truncate", **columns) -> dict[str, list[int]]:
    """One conversation through the production tokeniser (`encode_batch`, a one-row batch)."""
    batch = {"conversations": [turns], "system": [system]}
    out = encode_batch(batch, tokenizer, max_length, too_long, system_column="system", **columns)
    return {"input_ids": out["input_ids"][0], "labels": out["labels"][0], "status": out["status"][0]}


def trained_spans(tokenizer, example) -> list[str]:
    """Decode each maximal run of tokens that carry a label."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_multi_turn_mask_covers_exactly_the_assistant_turns(chat_tokenizer, template):
    turns = MULTI_TURN
    if template == "plain":
        chat_tokenizer.chat_template = PLAIN_TEMPLATE
        turns = MULTI_TURN[1:]  # no system turn: the template injects its own
    messages = to_messages(turns)
    example = encode_one(chat_tokenizer, turns)
    assert example["status"] == chat.KEPT
    assert trained_spans(chat_tokenizer, example) == ["7<|im_end|>", "an answer with several words<|im_end|>"]
    # Everything else (system, user turns, role headers, trailing newlines) is masked but present.
    assert chat_tokenizer.decode(example["input_ids"]) == chat_tokenizer.apply_chat_template(messages, tokenize=False)


def test_fixture_multi_turn_conversation_trains_both_digits(chat_tokenizer):
    dm = ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/reranker/train.jsonl", max_length=512)
    dm.setup()
    multi = dm.train_examples[6]  # the fixture's two-judgement conversation
    assert trained_spans(chat_tokenizer, multi) == ["7<|im_end|>", "5<|im_end|>"]


def test_conversation_without_assistant_turn_is_skipped_and_counted(chat_tokenizer, caplog):
    dm = ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/reranker/train.jsonl", max_length=512)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert dm.stats["train"] == {
        "rows": 8, "kept": 7, "skipped": 1, "skipped_no_assistant": 1, "skipped_unknown_role": 0,
        "skipped_too_long": 0, "too_long": 0, "truncated": 0,
    }
    assert len(dm.train_examples) == 7
    assert "skipped 1 without an assistant turn" in caplog.text
    # none of the kept examples is the prompt-only one (its query text never appears)
    assert all("prime number" not in chat_tokenizer.decode(e["input_ids"]) for e in dm.train_examples)


def test_too_long_rows_are_truncated_pair_by_pair_and_counted(chat_tokenizer, caplog):
    # The ToolACE fixture's tool lists make every prompt far longer than 64 byte-level tokens.
    dm = ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/toolace/data.json", system_column="system", max_length=64)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert dm.stats["train"]["too_long"] == 3 and dm.stats["train"]["truncated"] == 3
    assert dm.stats["train"]["kept"] == 3 and dm.stats["train"]["skipped"] == 0
    assert "3 longer than 64 tokens, 3 of them truncated" in caplog.text
    # Hand-computed for the first row: prompt s tokens, answer t tokens (with <|im_end|>), budget 64.
    rows = json.load(open(f"{FIXTURES}/toolace/data.json"))
    full = encode_one(chat_tokenizer, rows[0]["conversations"], rows[0]["system"])  # no max_length: whole
    assert len(full["input_ids"]) > 64 and full["status"] == chat.KEPT
    t = sum(label != IGNORE_INDEX for label in full["labels"])
    s = full["labels"].index(next(label for label in full["labels"] if label != IGNORE_INDEX))
    assert 2 * t >= 64 and 2 * s >= 64  # both halves are long: the budget is shared in proportion
    n_target = int(64 * t / (s + t))
    example = dm.train_examples[0]
    assert len(example["input_ids"]) == 64
    assert example["input_ids"] == full["input_ids"][: 64 - n_target] + full["input_ids"][s : s + n_target]
    assert example["labels"] == [IGNORE_INDEX] * (64 - n_target) + full["input_ids"][s : s + n_target]


def test_too_long_rows_dropped_in_drop_mode_are_counted(chat_tokenizer, caplog):
    dm = ChatSFTDataModule(
        chat_tokenizer, path=f"{FIXTURES}/toolace/data.json", system_column="system", max_length=64, too_long="drop"
    )
    with pytest.raises(LokiError, match="no conversation with an assistant turn"):
        dm.setup()
    assert dm.stats["train"]["too_long"] == 3 and dm.stats["train"]["skipped_too_long"] == 3
    assert dm.stats["train"]["kept"] == 0 and dm.stats["train"]["truncated"] == 0
    with pytest.raises(LokiError, match="too_long"):
        ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/toolace/data.json", too_long="cut")


def test_reranker_rows_longer_than_max_length_keep_their_digit(chat_tokenizer):
    dm = ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/reranker/train.jsonl", max_length=100)
    dm.setup()
    stats = dm.stats["train"]
    assert stats["too_long"] == 7 and stats["truncated"] == 7 and stats["kept"] == 7
    for example in dm.train_examples:
        assert len(example["input_ids"]) == 100
        assert trained_spans(chat_tokenizer, example)[0][0] in "1234567"  # the answer digit survives


def test_split_budget_and_assemble_by_hand():
    assert split_budget(10, 2, 8) == (6, 2)  # short answer: kept whole, prompt cut on its right
    assert split_budget(3, 10, 8) == (3, 5)  # short prompt: kept whole, answer gets the rest
    assert split_budget(10, 10, 8) == (4, 4)  # both long: shared in proportion
    assert split_budget(4, 2, 8) == (4, 2)  # fits: untouched
    pieces = [([1, 2, 3, 4, 5, 6], False), ([7, 8], True), ([9], False), ([10, 11], True)]
    assert assemble(pieces, 20) == ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [-100] * 6 + [7, 8, -100, 10, 11], 11, chat.KEPT)
    # 11 tokens into 7: the first pair gets all 7 (answer whole, prompt cut to 5); the second pair nothing
    assert assemble(pieces, 7) == ([1, 2, 3, 4, 5, 7, 8], [-100] * 5 + [7, 8], 11, chat.TRUNCATED)
    # 11 into 9: first pair whole (8), one token left for the second pair: 2*2 >= 1, 2*1 >= 1 -> int(1*2/3)=0
    assert assemble(pieces, 9) == ([1, 2, 3, 4, 5, 6, 7, 8, 9], [-100] * 6 + [7, 8, -100], 11, chat.TRUNCATED)
    assert assemble(pieces, 7, "drop") == ([], [], 11, chat.TOO_LONG_SKIPPED)
    # 2*2 >= 4 and 2*50 >= 4: the answer's share is int(4*2/52) = 0, so nothing is left to train on
    assert assemble([([1] * 50, False), ([2, 3], True)], 4) == ([], [], 52, chat.TOO_LONG_SKIPPED)


def test_missing_column_names_the_column_and_the_file(chat_tokenizer):
    dm = ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/reranker/bad_column.jsonl")
    with pytest.raises(LokiError) as err:
        dm.setup()
    assert "'conversations'" in str(err.value) and "bad_column.jsonl" in str(err.value)

    dm = ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/reranker/train.jsonl", system_column="system_prompt")
    with pytest.raises(LokiError) as err:
        dm.setup()
    assert "'system_prompt'" in str(err.value) and "train.jsonl" in str(err.value)


def test_unreachable_hub_names_the_dataset_and_the_override(chat_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = ChatSFTDataModule(chat_tokenizer, source="no-such-org/no-such-reranker-data")
    with pytest.raises(LokiError) as err:
        dm.setup()
    assert "no-such-org/no-such-reranker-data" in str(err.value) and "task.data.path=" in str(err.value)


def test_unknown_speaker_is_an_error_naming_the_override():
    with pytest.raises(LokiError, match="task.data.role_map"):
        to_messages([{"from": "narrator", "value": "once upon a time"}])


def test_system_column_and_tool_turns(chat_tokenizer, tmp_path):
    rows = [
        {
            "system": "Tools: [f]",
            "conversations": [
                {"from": "user", "value": "call f"},
                {"from": "assistant", "value": "[f(x=1)]"},
                {"from": "tool", "value": "{\"ok\": true}"},
                {"from": "assistant", "value": "done"},
            ],
        }
    ]
    file = tmp_path / "data.json"
    file.write_text(json.dumps(rows))
    dm = ChatSFTDataModule(chat_tokenizer, path=str(file), system_column="system", max_length=512)
    dm.setup()
    example = dm.train_examples[0]
    text = chat_tokenizer.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\nTools: [f]<|im_end|>") and "<|im_start|>tool\n" in text
    assert trained_spans(chat_tokenizer, example) == ["[f(x=1)]<|im_end|>", "done<|im_end|>"]


def test_batches_are_right_padded_with_ignored_labels(chat_tokenizer):
    dm = ChatSFTDataModule(
        chat_tokenizer,
        path=f"{FIXTURES}/reranker/train.jsonl",
        val_path=f"{FIXTURES}/reranker/val.jsonl",
        batch_size=3,
        max_length=512,
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    lengths = batch["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == chat_tokenizer.pad_token_id).all()
    assert len(list(dm.val_dataloader())) == 1 and dm.stats["val"]["kept"] == 2


def test_val_fraction_holds_out_rows_deterministically(chat_tokenizer):
    def split(seed):
        dm = ChatSFTDataModule(
            chat_tokenizer, path=f"{FIXTURES}/reranker/train.jsonl", val_fraction=0.25, max_length=512, seed=seed
        )
        dm.setup()
        return dm

    a, b = split(0), split(0)
    assert a.stats["train"]["rows"] + a.stats["val"]["rows"] == 8 and a.stats["val"]["rows"] == 2
    assert [e["input_ids"] for e in a.val_examples] == [e["input_ids"] for e in b.val_examples]


def test_knapsack_layout_by_hand():
    # sorted [1, 2, 3, 4, 5], capacity 6: take 5 then 1; then 4 then 2; then 3
    assert knapsack_packs([3, 4, 2, 5, 1], 6) == [[3, 4], [1, 2], [0]]
    assert knapsack_packs([2, 2, 2], 4) == [[2, 1], [0]]  # equal lengths: the later example first
    assert knapsack_packs([7, 3], 6) == [[1]]  # longer than the row: left out (truncation prevents it)


def packed_rows(examples, capacity, group=chat.PACK_GROUP):
    """Packed rows as the data module makes them: `pack_groups` over the lengths, read by `ChatExamples`."""
    from datasets import Dataset

    packs = pack_groups([len(e["input_ids"]) for e in examples], capacity, group)
    return list(ChatExamples(Dataset.from_list(examples), packs))


def test_packing_concatenates_with_position_ids_restarting():
    examples = [{"input_ids": [i] * n, "labels": [IGNORE_INDEX] * (n - 1) + [i]} for i, n in enumerate([3, 4, 2, 5, 1], 1)]
    packed = packed_rows(examples, 6)
    assert [r["input_ids"] for r in packed] == [[4, 4, 4, 4, 4, 5], [2, 2, 2, 2, 3, 3], [1, 1, 1]]
    assert [r["labels"] for r in packed] == [
        [-100, -100, -100, -100, 4, 5], [-100, -100, -100, 2, -100, 3], [-100, -100, 1]
    ]
    assert [r["position_ids"] for r in packed] == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 1], [0, 1, 2]]
    # groups of `group` examples are packed separately (LLaMA-Factory packs one map batch at a time)
    assert [r["input_ids"] for r in packed_rows(examples, 6, group=2)] == [[2] * 4, [1] * 3, [4] * 5, [3] * 2, [5]]
    assert pack_groups([3, 4, 2, 5, 1], 6, group=2) == [[1], [0], [3], [2], [4]]  # indices into the whole list


def test_packed_datamodule_rows_fit_the_cutoff_and_carry_position_ids(chat_tokenizer):
    plain = ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/reranker/train.jsonl", max_length=512)
    plain.setup()
    dm = ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/reranker/train.jsonl", max_length=512, packing=True, batch_size=8)
    dm.setup()
    lengths = [len(e["input_ids"]) for e in plain.train_examples]
    assert dm.stats["train"]["packed_rows"] == len(dm.train_examples) == len(knapsack_packs(lengths, 511))
    rows = list(dm.train_examples)
    assert all(len(r["input_ids"]) <= 511 for r in rows)  # cutoff_len - 1, as LLaMA-Factory packs
    assert sorted(sum((r["input_ids"] for r in rows), [])) == sorted(sum((e["input_ids"] for e in plain.train_examples), []))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert dm.val_examples == []


def test_collate_pads_on_the_right():
    batch = collate_right_padded([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def _forbid_tokenising(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache")

    monkeypatch.setattr(loki.data.chat.tokenise, "encode_batch", fail)


def test_second_datamodule_reads_the_cache_without_tokenising(chat_tokenizer, tmp_path, monkeypatch):
    settings = dict(path=f"{FIXTURES}/reranker/train.jsonl", val_fraction=0.25, max_length=512, cache_dir=str(tmp_path))
    first = ChatSFTDataModule(chat_tokenizer, **settings)
    first.setup()
    caches = sorted((tmp_path / "data").iterdir())
    assert [c.name.startswith("chat-") for c in caches] == [True] and (caches[0] / "manifest.json").is_file()
    files = {f: f.stat().st_mtime_ns for f in caches[0].iterdir()}

    _forbid_tokenising(monkeypatch)
    second = ChatSFTDataModule(chat_tokenizer, **settings, seed=1)  # another seed shares the tokens
    second.setup()
    assert {f: f.stat().st_mtime_ns for f in caches[0].iterdir()} == files
    assert second.stats["train"]["rows"] + second.stats["val"]["rows"] == 8
    third = ChatSFTDataModule(chat_tokenizer, **settings)
    third.setup()
    assert [e["input_ids"] for e in third.train_examples] == [e["input_ids"] for e in first.train_examples]
    assert third.stats == first.stats

    # a different max_length, tokenizer template or too_long mode is another cache
    for changed in (dict(max_length=256), dict(too_long="drop"), dict(packing=True)):
        assert ChatSFTDataModule(chat_tokenizer, **{**settings, **changed}).cache_path(None, settings["path"], "train") != caches[0]
    chat_tokenizer.chat_template = PLAIN_TEMPLATE
    assert ChatSFTDataModule(chat_tokenizer, **settings).cache_path(None, settings["path"], "train") != caches[0]


def test_prepare_data_tokenises_and_setup_only_loads(chat_tokenizer, tmp_path, monkeypatch):
    dm = ChatSFTDataModule(
        chat_tokenizer,
        path=f"{FIXTURES}/reranker/train.jsonl",
        val_path=f"{FIXTURES}/reranker/val.jsonl",
        max_length=512,
        cache_dir=str(tmp_path),
    )
    dm.prepare_data()
    assert dm.train_examples is None and len(list((tmp_path / "data").glob("chat-*/manifest.json"))) == 2
    _forbid_tokenising(monkeypatch)
    dm.setup()
    assert dm.stats["train"]["kept"] == 7 and dm.stats["val"]["kept"] == 2
    dm.prepare_data()  # a second call finds everything cached


def test_cache_reads_a_changed_file_again(chat_tokenizer, tmp_path):
    file = tmp_path / "data.jsonl"
    lines = open(f"{FIXTURES}/reranker/train.jsonl").read().splitlines()
    file.write_text("\n".join(lines[:3]) + "\n")
    a = ChatSFTDataModule(chat_tokenizer, path=str(file), max_length=512, cache_dir=str(tmp_path))
    a.setup()
    file.write_text("\n".join(lines[:5]) + "\n")
    b = ChatSFTDataModule(chat_tokenizer, path=str(file), max_length=512, cache_dir=str(tmp_path))
    b.setup()
    assert (a.stats["train"]["rows"], b.stats["train"]["rows"]) == (3, 5)


def _lb_rows_with_extra_columns(n_extra=15):
    rows = [json.loads(line) for line in open(f"{FIXTURES}/reranker/train.jsonl")]
    for i, row in enumerate(rows):
        for k in range(n_extra):
            row[f"extra_{k}"] = f"unused {i}.{k}" if k % 2 else float(i * k)
    return rows


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_only_the_used_columns_are_read(chat_tokenizer, tmp_path, monkeypatch, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _lb_rows_with_extra_columns()
    for row in rows:
        row["system"] = "Be brief."
    file = tmp_path / f"lb{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), file)
    else:
        file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset, origin = load_rows(None, str(file), "train", columns=["conversations", "system"])
    assert dataset.column_names == ["conversations", "system"] and origin == str(file)
    if suffix == ".parquet":  # the unused columns never reach the Arrow cache either
        assert dataset.data.schema.names == ["conversations", "system"]

    seen = []
    encode = loki.data.chat.tokenise.encode_batch

    def spy(batch, *args, **kwargs):
        seen.append(sorted(batch.keys()))
        return encode(batch, *args, **kwargs)

    monkeypatch.setattr(loki.data.chat.tokenise, "encode_batch", spy)
    dm = ChatSFTDataModule(chat_tokenizer, path=str(file), system_column="system", max_length=512, cache_dir=str(tmp_path))
    dm.setup()
    assert seen and all(keys == ["conversations", "system"] for keys in seen)
    assert dm.stats["train"]["kept"] == 7


def test_unknown_speaker_rows_are_skipped_and_counted(chat_tokenizer, tmp_path, caplog):
    rows = json.load(open(f"{FIXTURES}/toolace/data.json"))
    rows[1]["conversations"].insert(1, {"from": "narrator", "value": "meanwhile"})
    file = tmp_path / "toolace.json"
    file.write_text(json.dumps(rows))
    role_map = {"user": "user", "assistant": "assistant", "tool": "tool"}
    dm = ChatSFTDataModule(chat_tokenizer, path=str(file), system_column="system", role_map=role_map, max_length=2048)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert dm.stats["train"]["skipped_unknown_role"] == 1 and dm.stats["train"]["skipped"] == 1
    assert dm.stats["train"]["kept"] == 2 and len(dm.train_examples) == 2
    assert "'narrator'" not in caplog.text and "narrator; add it with task.data.role_map" in caplog.text


def test_hub_load_error_is_one_sentence_naming_the_override():
    err = hub_load_error("org/data", "train", ConnectionError("offline\nmore detail"), "task.data.path")
    assert isinstance(err, LokiError)
    assert str(err) == (
        "could not load dataset 'org/data' split 'train' (offline); pass task.data.path=/path/to/file.jsonl "
        "(same schema) to read a local copy."
    )


# ------------------------------------------------------------------------------ the cache key, the config


def test_settings_digest_is_sha256_of_sorted_json():
    import hashlib
    from pathlib import Path

    settings = {"b": 1, "a": [Path("/x"), None]}
    text = '{"a": ["/x", null], "b": 1}'  # sorted keys, the Path as its str()
    assert settings_digest(settings) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert settings_digest(settings, length=20) == hashlib.sha256(text.encode()).hexdigest()[:20]


def test_cache_key_is_the_one_before_the_package_split(chat_tokenizer, tmp_path):
    """Existing token caches stay valid: these names were computed by the single-module loader
    (loki/data/chat.py at commit 8f3928f) for the same settings and the test tokenizer."""
    assert chat.tokenizer_fingerprint(chat_tokenizer) == "a76b3b23312308fc"
    old_key = {
        "version": 1, "tokenizer": "a76b3b23312308fc", "max_length": 1024, "cutoff": 1024, "packing": False,
        "too_long": "truncate", "input": {"source": "Team-ACE/ToolACE", "split": "train"}, "max_samples": None,
        "conversations_column": "conversations", "system_column": None, "role_map": None, "role_key": "from",
        "content_key": "value",
    }
    assert settings_digest(old_key, length=20) == "32ebb8d0b25f30779cee"
    dm = ChatSFTDataModule(chat_tokenizer, source="Team-ACE/ToolACE", cache_dir=str(tmp_path))
    assert dm.cache_path("Team-ACE/ToolACE", None, "train") == tmp_path / "data" / "chat-32ebb8d0b25f30779cee"
    toolace = ChatSFTDataModule(
        chat_tokenizer, source="Team-ACE/ToolACE", cache_dir=str(tmp_path), max_length=2048, packing=True,
        system_column="system", role_map={"user": "user", "assistant": "assistant", "tool": "tool"}, max_samples=100,
    )
    assert toolace.cache_path("Team-ACE/ToolACE", None, "train").name == "chat-d5d640566381049c6c30"
    assert toolace.cache_path("Team-ACE/ToolACE", None, "train", with_limit=False).name == "chat-a37bdc23d9138dcab566"


def test_yaml_block_instantiates_the_same_module_as_keywords(chat_tokenizer, tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config("train", "task=toolace", f"task.data.cache_dir={tmp_path}")
    dm = instantiate(cfg.task.data, tokenizer=chat_tokenizer, seed=3)
    assert isinstance(dm, ChatSFTDataModule) and dm.config.seed == 3
    assert dm.config.role_map == {"user": "user", "assistant": "assistant", "tool": "tool"}
    assert type(dm.config.role_map) is dict  # not an OmegaConf node: it goes into the cache key as JSON
    plain = ChatSFTDataModule(
        chat_tokenizer, source="Team-ACE/ToolACE", val_fraction=0.01, max_length=2048, batch_size=4, num_workers=2,
        system_column="system", role_map={"user": "user", "assistant": "assistant", "tool": "tool"}, cache_dir=str(tmp_path),
    )
    assert dm.cache_path("Team-ACE/ToolACE", None, "train") == plain.cache_path("Team-ACE/ToolACE", None, "train")
    # a config object and keyword overrides on top of it
    again = ChatSFTDataModule(chat_tokenizer, plain.config, batch_size=2)
    assert again.config.batch_size == 2 and plain.config.batch_size == 4 and again.config.role_map == plain.config.role_map


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(path=None, source=None), "task.data.source must be a hub dataset id when task.data.path is null, got None."),
        (dict(val_fraction=1.0), "task.data.val_fraction must be a number in [0, 1), got 1.0."),
        (dict(val_fraction="half"), "task.data.val_fraction must be a number in [0, 1), got 'half'."),
        (dict(too_long="cut"), "task.data.too_long must be one of truncate, drop, got 'cut'."),
        (dict(max_length=0), "task.data.max_length must be an integer >= 1, got 0."),
        (dict(max_length=1, packing=True), "task.data.max_length must be an integer >= 2, got 1."),
        (dict(max_length=512.5), "task.data.max_length must be an integer >= 1, got 512.5."),
        (dict(packing="yes"), "task.data.packing must be true or false, got 'yes'."),
        (dict(batch_size=0), "task.data.batch_size must be an integer >= 1, got 0."),
        (dict(batch_size=True), "task.data.batch_size must be an integer >= 1, got True."),
        (dict(eval_batch_size=0), "task.data.eval_batch_size must be an integer >= 1 (or null), got 0."),
        (dict(max_samples=0), "task.data.max_samples must be an integer >= 1 (or null), got 0."),
        (dict(seed="s"), "task.data.seed must be an integer, got 's'."),
        (dict(num_workers=-1), "task.data.num_workers must be an integer >= 0, got -1."),
        (dict(num_proc=0), "task.data.num_proc must be an integer >= 1 (or null), got 0."),
        (dict(map_batch_size=0), "task.data.map_batch_size must be an integer >= 1, got 0."),
        (dict(split=""), "task.data.split must be a non-empty string, got ''."),
        (dict(conversations_column=None), "task.data.conversations_column must be a non-empty string, got None."),
        (dict(system_column=""), "task.data.system_column must be a non-empty string (or null), got ''."),
        (dict(role_key=3), "task.data.role_key must be a non-empty string, got 3."),
        (dict(role_map=["user"]), "task.data.role_map must be a mapping of speaker names to roles (or null), got ['user']."),
        (dict(role_map={"gpt": None}), "task.data.role_map.gpt must be a chat-template role such as user, assistant or tool, got None."),
    ],
)
def test_config_refuses_bad_values_in_one_sentence(settings, message):
    with pytest.raises(LokiError) as err:
        ChatDataConfig(**{"path": "data.jsonl", **settings})
    assert str(err.value) == message


def test_config_refuses_unknown_keys_and_normalises_values():
    with pytest.raises(LokiError, match=r"^task.data has no setting 'max_len'; the chat loader's settings are source, path,"):
        ChatDataConfig.from_settings({"path": "data.jsonl", "max_len": 10})
    config = ChatDataConfig.from_settings({"path": "data.jsonl", "max_length": 64, "val_fraction": 0, "role_map": {}})
    assert (config.max_length, config.val_fraction, config.role_map) == (64, 0.0, None)
    assert type(config.val_fraction) is float
    assert config.cutoff == 64 and ChatDataConfig(path="d", max_length=64, packing=True).cutoff == 63
    assert config.eval_batch == 8 and ChatDataConfig(path="d", eval_batch_size=2).eval_batch == 2
