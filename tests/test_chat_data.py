"""Chat SFT loader: assistant-only loss masks, skipped conversations, bad input, batching."""

from __future__ import annotations

import json

import pytest
import torch

from loki.data.chat import (
    IGNORE_INDEX,
    ChatSFTDataModule,
    collate_right_padded,
    pack_examples,
    to_messages,
    tokenize_conversation,
)
from loki.errors import LokiError

FIXTURES = "tests/fixtures"

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
    example = tokenize_conversation(chat_tokenizer, messages)
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
    assert dm.stats["train"] == {"rows": 8, "kept": 7, "skipped_no_assistant": 1, "skipped_truncated": 0}
    assert len(dm.train_examples) == 7
    assert "skipped 1 without an assistant turn" in caplog.text
    # none of the kept examples is the prompt-only one (its query text never appears)
    assert all("prime number" not in chat_tokenizer.decode(e["input_ids"]) for e in dm.train_examples)


def test_truncation_that_removes_every_assistant_token_is_counted(chat_tokenizer):
    dm = ChatSFTDataModule(chat_tokenizer, path=f"{FIXTURES}/toolace/data.json", system_column="system", max_length=64)
    with pytest.raises(LokiError, match="no conversation with an assistant turn"):
        dm.setup()
    assert dm.stats["train"]["skipped_truncated"] == 3


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


def test_packing_keeps_every_token_and_respects_max_length():
    examples = [{"input_ids": [i] * n, "labels": [IGNORE_INDEX] * (n - 1) + [i]} for i, n in enumerate([3, 4, 2, 5, 1], 1)]
    packed = pack_examples(examples, max_length=6)
    assert [len(r["input_ids"]) for r in packed] == [3, 6, 6]  # [3], [4, 2], [5, 1]: whole examples only
    assert sum((r["input_ids"] for r in packed), []) == sum((e["input_ids"] for e in examples), [])
    assert sum((r["labels"] for r in packed), []) == sum((e["labels"] for e in examples), [])


def test_collate_pads_on_the_right():
    batch = collate_right_padded([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
