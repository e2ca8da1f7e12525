"""Chat SFT data: ShareGPT-style `conversations` -> token ids with the loss on assistant tokens only.

One path for every chat task (the LB reranker, ToolACE, the toy task): a hub id (`source`) or a local
.jsonl/.json/.parquet file in the same schema (`path`) goes through `datasets.load_dataset`.

Loss masks are computed by rendering prefixes of the conversation with the model's own chat template,
so they work for templates without `{% generation %}` tags (Qwen2.5's and Llama-3.1's ship none):
for assistant turn i, the text rendered for `messages[:i]` with the generation prompt ends where the
assistant's content starts; the trained span runs from there through the first end-of-turn token
(`tokenizer.eos_token`) after the content (or to the end of the turn's rendering if it has none).
The text is then tokenised segment by segment, so every token is either fully inside or outside a span.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from loki.errors import LokiError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label HF causal LMs skip in their loss

# ShareGPT speaker names -> chat-template roles. Unlisted names are an error, not silently dropped.
DEFAULT_ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path) -> Path:
    """A user path as given if it exists (absolute or relative to the working directory), else relative
    to the repository root, so configs can name `tests/fixtures/...` from any working directory."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    in_repo = _REPO_ROOT / candidate
    return in_repo if in_repo.exists() else candidate


def load_rows(source: str | None, path: str | Path | None, split: str, what: str = "chat data", override: str = "task.data.path"):
    """A `datasets.Dataset` from a local file (`path`, preferred) or a hub id (`source`)."""
    from datasets import load_dataset

    if path:
        file = resolve_path(path)
        if not file.is_file():
            raise LokiError(f"{what} file '{path}' does not exist.")
        builder = _BUILDERS.get(file.suffix)
        if builder is None:
            raise LokiError(f"{what} file '{file}' must be .jsonl, .json or .parquet.")
        return load_dataset(builder, data_files={"train": str(file)}, split="train"), str(file)
    if not source:
        raise LokiError(f"{what} needs a hub dataset id (source) or a local file ({override}=...).")
    try:
        return load_dataset(source, split=split), source
    except Exception as err:  # offline, unknown name, no such split: all mean "use local files"
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise LokiError(
            f"could not load dataset '{source}' split '{split}' ({reason}); "
            f"pass {override}=/path/to/file.jsonl (same schema) to read a local copy."
        ) from None


def to_messages(
    conversation: Sequence[Mapping[str, Any]],
    system: str | None = None,
    role_map: Mapping[str, str] | None = None,
    role_key: str = "from",
    content_key: str = "value",
) -> list[dict[str, str]]:
    """ShareGPT turns as chat messages; a non-empty `system` (from the system column) goes first."""
    roles = dict(role_map or DEFAULT_ROLE_MAP)
    messages = [{"role": "system", "content": system}] if system else []
    for turn in conversation:
        speaker = turn.get(role_key)
        if speaker not in roles:
            raise LokiError(
                f"conversation turn has speaker {speaker!r}, not in the role map {sorted(roles)}; "
                "add it with task.data.role_map."
            )
        messages.append({"role": roles[speaker], "content": str(turn.get(content_key) or "")})
    return messages


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_trained) pieces that concatenate to the full text."""
    full = _render(tokenizer, messages, False)
    eos = tokenizer.eos_token
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], True)
        through_text = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(start_text) and full.startswith(through_text) and len(start_text) >= cursor):
            raise LokiError(
                "the chat template does not render conversations prefix by prefix (it rewrites earlier turns), "
                "so assistant-only loss masks cannot be derived from it."
            )
        turn = through_text[len(start_text) :]
        content_at = turn.find(message["content"]) if message["content"] else 0
        content_end = (content_at if content_at >= 0 else 0) + len(message["content"])
        eos_at = turn.find(eos, content_end) if eos else -1
        end = len(start_text) + (eos_at + len(eos) if eos_at >= 0 else len(turn))
        segments.append((full[cursor : len(start_text)], False))
        segments.append((full[len(start_text) : end], True))
        cursor = end
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> dict[str, list[int]]:
    """input_ids and labels (-100 outside assistant spans), right-truncated to `max_length`."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in assistant_segments(tokenizer, messages):
        # The template writes any BOS itself; add_special_tokens=False keeps it from appearing twice.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    if max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def pack_examples(examples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy in-order packing of whole examples into rows of at most `max_length` tokens.

    Examples are never split, so each answer keeps its prompt. Attention is not blocked between the
    examples of a row (the common "packing" trade-off); labels still cover only assistant tokens.
    """
    packed: list[dict[str, list[int]]] = []
    row: dict[str, list[int]] = {"input_ids": [], "labels": []}
    for example in examples:
        if row["input_ids"] and len(row["input_ids"]) + len(example["input_ids"]) > max_length:
            packed.append(row)
            row = {"input_ids": [], "labels": []}
        row["input_ids"] = row["input_ids"] + list(example["input_ids"])
        row["labels"] = row["labels"] + list(example["labels"])
    if row["input_ids"]:
        packed.append(row)
    return packed


def collate_right_padded(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right padding for training: pad ids are masked in attention and ignored in the loss."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_examples(
    tokenizer,
    dataset,
    origin: str,
    max_length: int | None,
    conversations_column: str = "conversations",
    system_column: str | None = None,
    role_map: Mapping[str, str] | None = None,
    role_key: str = "from",
    content_key: str = "value",
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenised examples and counts of what was kept and skipped (and why)."""
    for column in [conversations_column] + ([system_column] if system_column else []):
        if column not in dataset.column_names:
            raise LokiError(
                f"chat data '{origin}' has no column '{column}' (it has {', '.join(dataset.column_names)}); "
                "set task.data.conversations_column / task.data.system_column to the right names."
            )
    roles = dict(role_map or DEFAULT_ROLE_MAP)
    stats = {"rows": 0, "kept": 0, "skipped_no_assistant": 0, "skipped_truncated": 0}
    examples = []
    for row in dataset:
        stats["rows"] += 1
        conversation = row[conversations_column]
        if isinstance(conversation, str):  # some dumps store the list as JSON text
            import json

            conversation = json.loads(conversation)
        system = row[system_column] if system_column else None
        messages = to_messages(conversation or [], system, roles, role_key, content_key)
        if not any(m["role"] == "assistant" for m in messages):
            stats["skipped_no_assistant"] += 1  # nothing to learn; training on it would teach the prompt
            continue
        example = tokenize_conversation(tokenizer, messages, max_length)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            stats["skipped_truncated"] += 1  # max_length cut off every assistant token
            continue
        stats["kept"] += 1
        examples.append(example)
    return examples, stats


class ChatSFTDataModule(pl.LightningDataModule):
    """Chat SFT batches (input_ids, attention_mask, labels) from ShareGPT-style conversations.

    Validation: a named split (`val_split`, hub only) or a seeded `val_fraction` of the training rows.
    After `setup()`, `self.stats` holds the per-split counts of kept and skipped conversations.
    """

    def __init__(
        self,
        tokenizer,
        source: str | None = None,
        path: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.0,
        max_samples: int | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        packing: bool = False,
        conversations_column: str = "conversations",
        system_column: str | None = None,
        role_map: Mapping[str, str] | None = None,
        role_key: str = "from",
        content_key: str = "value",
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if not 0.0 <= float(val_fraction) < 1.0:
            raise LokiError(f"task.data.val_fraction must be in [0, 1), got {val_fraction}.")
        self.tokenizer = tokenizer
        self.source, self.path, self.split = source, path, split
        self.val_split, self.val_path, self.val_fraction = val_split, val_path, float(val_fraction)
        self.max_samples, self.max_length = max_samples, int(max_length)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size or batch_size)
        self.packing = bool(packing)
        self.columns = dict(
            conversations_column=conversations_column,
            system_column=system_column,
            role_map=dict(role_map) if role_map else None,
            role_key=role_key,
            content_key=content_key,
        )
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] = []
        self.stats: dict[str, dict[str, int]] = {}

    def _examples(self, dataset, origin: str, name: str) -> list[dict]:
        examples, stats = build_examples(self.tokenizer, dataset, origin, self.max_length, **self.columns)
        self.stats[name] = stats
        skipped = stats["skipped_no_assistant"] + stats["skipped_truncated"]
        message = (
            f"{name} data '{origin}': {stats['kept']} of {stats['rows']} conversations kept; skipped "
            f"{stats['skipped_no_assistant']} without an assistant turn, {stats['skipped_truncated']} truncated "
            f"to no assistant token at max_length={self.max_length}"
        )
        (log.warning if skipped else log.info)(message)
        if not examples:
            raise LokiError(f"{name} data '{origin}' has no conversation with an assistant turn to train on.")
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        dataset, origin = load_rows(self.source, self.path, self.split)
        if self.max_samples is not None and int(self.max_samples) < len(dataset):
            dataset = dataset.select(range(int(self.max_samples)))  # the first rows: a stable subset
        val_dataset = None
        if self.val_path or self.val_split:
            val_dataset, val_origin = load_rows(
                self.source, self.val_path, self.val_split or self.split, override="task.data.val_path"
            )
        elif self.val_fraction > 0 and len(dataset) > 1:
            order = list(range(len(dataset)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, int(round(self.val_fraction * len(dataset))))
            val_dataset, val_origin = dataset.select(sorted(order[:n_val])), origin
            dataset = dataset.select(sorted(order[n_val:]))
        self.train_examples = self._examples(dataset, origin, "train")
        if val_dataset is not None:
            self.val_examples = self._examples(val_dataset, val_origin, "val")
        if self.packing:
            self.train_examples = pack_examples(self.train_examples, self.max_length)

    def _collate(self, rows):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return collate_right_padded(rows, pad)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_examples,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_examples:
            return []
        return DataLoader(
            self.val_examples, batch_size=self.eval_batch_size, collate_fn=self._collate, num_workers=self.num_workers
        )
