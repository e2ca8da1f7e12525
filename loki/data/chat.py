"""Chat SFT data: ShareGPT-style `conversations` -> token ids with the loss on assistant tokens only.

One path for every chat task (the LB reranker, ToolACE, the toy task): a hub id (`source`) or a local
.jsonl/.json/.parquet file in the same schema (`path`) goes through `datasets.load_dataset`.

Loss masks are computed by rendering prefixes of the conversation with the model's own chat template,
so they work for templates without `{% generation %}` tags (Qwen2.5's and Llama-3.1's ship none):
for assistant turn i, the text rendered for `messages[:i]` with the generation prompt ends where the
assistant's content starts; the trained span runs from there through the first end-of-turn token
(`tokenizer.eos_token`) after the content (or to the end of the turn's rendering if it has none).
The text is then tokenised segment by segment, so every token is either fully inside or outside a span.

Scale (the LB set is 2.28M conversations). Tokenisation happens once, in `prepare_data` (one process per
node), with a batched `datasets.Dataset.map` (`num_proc` processes, one tokenizer call per batch of
segments). The result is a set of Arrow files under `<cache_dir>/data/chat-<key>/`, where the key hashes
everything that changes the tokens: the tokenizer (its serialised vocab/merges/normalisers, or its vocab
for a slow one), the chat template and end-of-turn token, `max_length`, `too_long`, `packing`, the source
(a local file's absolute path, size and mtime; or the hub id and split), `max_samples` and the column and
role settings. `manifest.json` is written last and the directory renamed into place, so a half-written
cache is never read; ranks, later runs and sweep jobs reuse it. `setup` memory-maps those files and does
only index work (the seeded validation split, packing); it builds the cache itself if `prepare_data` was
not called (a plain script or test). Only the conversations column and the optional system column are
read: parquet files and parquet-backed hub datasets never read the others from disk; JSON is parsed by
Arrow and the unused columns are dropped before any row reaches Python.

Rows longer than `max_length` are counted (`stats[split]["too_long"]`) and never dropped silently. With
`too_long: truncate` (the default, as LLaMA-Factory does) the conversation is cut turn pair by turn pair:
each (prompt, answer) pair gets the token budget left after the earlier pairs, split by LLaMA-Factory's
rule (an answer shorter than half the budget is kept whole and the prompt is cut on its right; else a
prompt shorter than half the budget is kept whole and the answer cut; else both are cut in proportion to
their lengths); pairs after the budget is spent are dropped. A row whose truncation leaves no assistant
token is skipped and counted. With `too_long: drop` every too-long row is skipped and counted.

Packing (`packing: true`) mirrors LLaMA-Factory's `packing=True, neat_packing=False` for SFT:
the cutoff becomes `max_length - 1` (LLaMA-Factory lowers `cutoff_len` by one when packing), each
example is truncated to it as above, and the examples are grouped, 1000 at a time (LLaMA-Factory's
`preprocessing_batch_size`), by its greedy knapsack: sort the lengths, fill one row at a time with the
longest remaining example that still fits (of equal lengths, the later example first), until none fits.
A packed row is the plain concatenation of its examples with one all-ones attention mask, so tokens
attend across example boundaries; labels stay on assistant tokens only; `position_ids` restart at 0 for
each example (LLaMA-Factory emits them too). Not mirrored: LLaMA-Factory pads every packed row to
`cutoff_len` with attended pad tokens; here the collator pads to the longest row of the batch with
masked pads (to the right of every real token, so the loss is the same). The validation rows are never
packed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import socket
import time
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from loki.device import pad_batch, pad_token_id
from loki.errors import LokiError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label HF causal LMs skip in their loss
CACHE_VERSION = 1  # bump when the cached layout or the tokenisation rules change
PACK_GROUP = 1000  # examples packed together at a time (LLaMA-Factory's preprocessing_batch_size)
TOO_LONG_MODES = ("truncate", "drop")

# ShareGPT speaker names -> chat-template roles. Conversations with unlisted names are skipped and counted.
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

# Per-row outcome codes stored in the cache (column `status`).
KEPT, TRUNCATED, NO_ASSISTANT, UNKNOWN_ROLE, TOO_LONG_SKIPPED = 0, 1, 2, 3, 4

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


# ------------------------------------------------------------------------------------------- loading


def hub_load_error(source: str, split: str | None, err: BaseException, override: str, what: str = "dataset") -> LokiError:
    """The one-sentence error for a hub dataset that could not be loaded (offline, unknown name, no such
    split): all mean "use a local copy", so it names the dataset and the setting to pass instead."""
    reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    where = f" split '{split}'" if split else ""
    return LokiError(
        f"could not load {what} '{source}'{where} ({reason}); pass {override}=/path/to/file.jsonl (same schema) "
        "to read a local copy."
    )


def load_hub(source: str, *args, split: str | None = None, override: str = "task.data.path", what: str = "dataset", **kwargs):
    """`datasets.load_dataset(source, *args, split=split, **kwargs)`, any failure as `hub_load_error`."""
    from datasets import load_dataset

    try:
        return load_dataset(source, *args, split=split, **kwargs)
    except Exception as err:
        raise hub_load_error(source, split, err, override, what) from None


def load_rows(
    source: str | None,
    path: str | Path | None,
    split: str,
    what: str = "chat data",
    override: str = "task.data.path",
    columns: Sequence[str] | None = None,
):
    """A `datasets.Dataset` from a local file (`path`, preferred) or a hub id (`source`), and its origin.

    `columns`: read only these (parquet: pruned at the reader; JSON: parsed by Arrow, then dropped). A
    named column the data lacks is an error naming the columns it has."""
    from datasets import load_dataset

    wanted = list(dict.fromkeys(columns)) if columns else None
    if path:
        file = resolve_path(path)
        if not file.is_file():
            raise LokiError(f"{what} file '{path}' does not exist.")
        builder = _BUILDERS.get(file.suffix)
        if builder is None:
            raise LokiError(f"{what} file '{file}' must be .jsonl, .json or .parquet.")
        origin = str(file)
        kwargs = {}
        if wanted and builder == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(file).names
            _check_columns(wanted, names, origin)
            kwargs["columns"] = wanted
        dataset = load_dataset(builder, data_files={"train": str(file)}, split="train", **kwargs)
    else:
        if not source:
            raise LokiError(f"{what} needs a hub dataset id (source) or a local file ({override}=...).")
        origin = source
        dataset = None
        if wanted:
            try:  # parquet-backed hub datasets (most of them) read only these columns
                dataset = load_dataset(source, split=split, columns=wanted)
            except Exception as err:
                if "columns" not in str(err):  # a builder without a `columns` option is retried below
                    raise hub_load_error(source, split, err, override, what) from None
        if dataset is None:
            dataset = load_hub(source, split=split, override=override, what=what)
    if wanted:
        _check_columns(wanted, dataset.column_names, origin)
        if dataset.column_names != wanted:
            dataset = dataset.select_columns(wanted)
    return dataset, origin


def _check_columns(wanted: Sequence[str], present: Sequence[str], origin: str) -> None:
    for column in wanted:
        if column not in present:
            raise LokiError(
                f"chat data '{origin}' has no column '{column}' (it has {', '.join(present)}); "
                "set task.data.conversations_column / task.data.system_column to the right names."
            )


# ------------------------------------------------------------------------------------- tokenising


def to_messages(
    conversation: Sequence[Mapping[str, Any]],
    system: str | None = None,
    role_map: Mapping[str, str] | None = None,
    role_key: str = "from",
    content_key: str = "value",
) -> list[dict[str, str]]:
    """ShareGPT turns as chat messages; a non-empty `system` (from the system column) goes first.

    A speaker the role map does not know is a LokiError (the data module catches it, skips the row and
    counts it)."""
    roles = role_map or DEFAULT_ROLE_MAP
    messages = [{"role": "system", "content": system}] if system else []
    for turn in conversation:
        speaker = turn.get(role_key)
        if speaker not in roles:
            raise UnknownSpeaker(
                f"conversation turn has speaker {speaker!r}, not in the role map {sorted(roles)}; "
                "add it with task.data.role_map.",
                speaker,
            )
        messages.append({"role": roles[speaker], "content": str(turn.get(content_key) or "")})
    return messages


class UnknownSpeaker(LokiError):
    """A conversation turn whose speaker name is not in the role map."""

    def __init__(self, message: str, speaker: Any = None):
        super().__init__(message)
        self.speaker = speaker


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
        # the last turn rendered through is the whole conversation: no third rendering
        through_text = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
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


def split_budget(source_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """Tokens kept of a (prompt, answer) pair given `budget` tokens: LLaMA-Factory's cutoff rule.

    An answer shorter than half the budget is kept whole; else a prompt shorter than half is kept whole
    and the answer gets the rest; else the budget is shared in proportion. The prompt gets what is left.
    """
    if 2 * target_len < budget:
        target_cap = budget
    elif 2 * source_len < budget:
        target_cap = budget - source_len
    else:
        target_cap = int(budget * (target_len / (source_len + target_len)))
    new_target = min(target_cap, target_len)
    return min(max(budget - new_target, 0), source_len), new_target


def _pairs(pieces: Sequence[tuple[list[int], bool]]) -> list[tuple[list[int], list[int]]]:
    """(untrained, trained) token pieces grouped as (prompt, answer) pairs; a trailing prompt has []."""
    pairs: list[tuple[list[int], list[int]]] = []
    source: list[int] = []
    for ids, trained in pieces:
        if trained:
            pairs.append((source, list(ids)))
            source = []
        else:
            source = source + list(ids)
    if source:
        pairs.append((source, []))
    return pairs


def assemble(pieces: Sequence[tuple[list[int], bool]], max_length: int | None, too_long: str = "truncate"):
    """input_ids, labels, the untruncated length and the outcome code (KEPT, TRUNCATED, TOO_LONG_SKIPPED)."""
    length = sum(len(ids) for ids, _ in pieces)
    if max_length and length > max_length:
        if too_long == "drop":
            return [], [], length, TOO_LONG_SKIPPED
        input_ids: list[int] = []
        labels: list[int] = []
        for source, target in _pairs(pieces):
            if len(input_ids) >= max_length:
                break
            n_source, n_target = split_budget(len(source), len(target), max_length - len(input_ids))
            input_ids += source[:n_source] + target[:n_target]
            labels += [IGNORE_INDEX] * n_source + target[:n_target]
        if all(label == IGNORE_INDEX for label in labels):
            return [], [], length, TOO_LONG_SKIPPED
        return input_ids, labels, length, TRUNCATED
    input_ids, labels = [], []
    for ids, trained in pieces:
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels, length, KEPT


def tokenize_conversation(
    tokenizer, messages: list[dict], max_length: int | None = None, too_long: str = "truncate"
) -> dict[str, list[int]]:
    """input_ids and labels (-100 outside assistant spans); a conversation longer than `max_length` is cut
    pair by pair as the module docstring says (empty lists if that leaves no assistant token, or if
    `too_long="drop"`)."""
    # The template writes any BOS itself; add_special_tokens=False keeps it from appearing twice.
    pieces = [(tokenizer(text, add_special_tokens=False)["input_ids"], trained) for text, trained in assistant_segments(tokenizer, messages)]
    input_ids, labels, _, _ = assemble(pieces, max_length, too_long)
    return {"input_ids": input_ids, "labels": labels}


def encode_batch(
    batch: Mapping[str, list],
    tokenizer,
    max_length: int | None,
    too_long: str = "truncate",
    conversations_column: str = "conversations",
    system_column: str | None = None,
    role_map: Mapping[str, str] | None = None,
    role_key: str = "from",
    content_key: str = "value",
) -> dict[str, list]:
    """A batched `Dataset.map` function: one output row per input row, with `input_ids`, `labels` (empty
    for a skipped row), `length` (tokens before truncation) and `status` (the outcome code). The texts of
    the whole batch go to the tokenizer in one call."""
    roles = dict(role_map or DEFAULT_ROLE_MAP)
    conversations = batch[conversations_column]
    systems = batch[system_column] if system_column else [None] * len(conversations)
    status: list[int] = []
    row_segments: list[list[tuple[str, bool]] | None] = []
    for conversation, system in zip(conversations, systems):
        if isinstance(conversation, str):  # some dumps store the list as JSON text
            conversation = json.loads(conversation)
        try:
            messages = to_messages(conversation or [], system, roles, role_key, content_key)
        except UnknownSpeaker:
            status.append(UNKNOWN_ROLE)
            row_segments.append(None)
            continue
        if not any(m["role"] == "assistant" for m in messages):
            status.append(NO_ASSISTANT)  # nothing to learn; training on it would teach the prompt
            row_segments.append(None)
            continue
        status.append(KEPT)
        row_segments.append(assistant_segments(tokenizer, messages))
    texts = [text for segments in row_segments if segments for text, _ in segments]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "status": []}
    cursor = 0
    for code, segments in zip(status, row_segments):
        if segments is None:
            ids, labels, length = [], [], 0
        else:
            pieces = [(encoded[cursor + j], trained) for j, (_, trained) in enumerate(segments)]
            cursor += len(segments)
            ids, labels, length, code = assemble(pieces, max_length, too_long)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(length)
        out["status"].append(code)
    return out


# -------------------------------------------------------------------------------------------- packing


def knapsack_packs(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped greedily into rows of at most `capacity` tokens (LLaMA-Factory's rule):
    lengths sorted ascending; each row takes the longest remaining length that fits, again and again, until
    none fits; of equal lengths the highest index goes first. Lengths over `capacity` are left out."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, n in enumerate(lengths):
        if n <= capacity:
            by_length[int(n)].append(index)
    remaining = sorted(n for n, indices in by_length.items() for _ in indices)
    packs: list[list[int]] = []
    while remaining:
        pack: list[int] = []
        room = capacity
        while remaining:
            at = bisect_right(remaining, room) - 1
            if at < 0:
                break
            n = remaining.pop(at)
            room -= n
            pack.append(by_length[n].pop())
        if not pack:  # only zero-room leftovers cannot happen with capacity > 0; guard against a loop
            break
        packs.append(pack)
    return packs


def pack_examples(examples: Sequence[Mapping[str, Sequence[int]]], max_length: int, group: int = PACK_GROUP) -> list[dict[str, list[int]]]:
    """Examples packed into rows of at most `max_length` tokens: `knapsack_packs` over each run of `group`
    examples, each row the concatenation of its examples, with `position_ids` restarting per example."""
    rows = []
    for start in range(0, len(examples), group):
        chunk = examples[start : start + group]
        for pack in knapsack_packs([len(e["input_ids"]) for e in chunk], max_length):
            rows.append(_concat([chunk[i] for i in pack]))
    return rows


def _concat(parts: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for part in parts:
        row["input_ids"] += list(part["input_ids"])
        row["labels"] += list(part["labels"])
        row["position_ids"] += list(range(len(part["input_ids"])))
    return row


# ------------------------------------------------------------------------------------------ batching


def collate_right_padded(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right padding for training: pad ids are masked in attention and ignored in the loss. Packed rows
    also carry `position_ids` (pads get 0, as LLaMA-Factory gives its pads)."""
    input_ids, attention_mask, labels = pad_batch(
        [r["input_ids"] for r in rows], pad_token_id, side="right", fill=[r["labels"] for r in rows], fill_pad=IGNORE_INDEX
    )
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if rows and "position_ids" in rows[0]:
        _, _, batch["position_ids"] = pad_batch(
            [r["input_ids"] for r in rows], pad_token_id, side="right", fill=[r["position_ids"] for r in rows], fill_pad=0
        )
    return batch


class ChatExamples(Dataset):
    """Tokenised examples backed by the memory-mapped cache: `ds[i]` is {"input_ids", "labels"} as lists
    (plus "position_ids" for a packed row, which concatenates its examples when it is read)."""

    def __init__(self, table, packs: list[list[int]] | None = None):
        self.table = table  # a datasets.Dataset with input_ids and labels, already restricted to kept rows
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs) if self.packs is not None else len(self.table)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.packs is None:
            return self.table[int(index)]
        rows = self.table[self.packs[index]]  # one read for the whole pack, in pack order
        return _concat([{"input_ids": a, "labels": b} for a, b in zip(rows["input_ids"], rows["labels"])])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


# ------------------------------------------------------------------------------------------- caching


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokens: the serialised fast tokenizer (vocab, merges, normalisers,
    added tokens) or a slow one's vocab, its class, the chat template and the end-of-turn token."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template, sort_keys=True)
    for part in (type(tokenizer).__name__, template or "", str(tokenizer.eos_token)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def default_cache_root() -> Path:
    """`$LOKI_CACHE`, else ~/.cache/loki: the default of `paths.cache_dir`."""
    return Path(os.environ.get("LOKI_CACHE") or Path.home() / ".cache" / "loki")


def _source_identity(source: str | None, path: str | None, split: str) -> dict:
    if path:
        file = resolve_path(path)
        if not file.is_file():
            raise LokiError(f"chat data file '{path}' does not exist.")
        stat = file.stat()
        return {"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"source": source, "split": split}


def _column(table, name: str) -> np.ndarray:
    """One scalar column as a numpy array, straight from Arrow (row iteration is ~100x slower)."""
    return np.asarray(table.select_columns([name]).with_format("arrow")[:][name].to_numpy())


def _stats_from(status: np.ndarray, lengths: np.ndarray, max_length: int) -> dict[str, int]:
    counts = np.bincount(status.astype(np.int64), minlength=5) if len(status) else np.zeros(5, dtype=np.int64)
    skipped = int(counts[NO_ASSISTANT] + counts[UNKNOWN_ROLE] + counts[TOO_LONG_SKIPPED])
    return {
        "rows": int(len(status)),
        "kept": int(counts[KEPT] + counts[TRUNCATED]),
        "skipped": skipped,
        "skipped_no_assistant": int(counts[NO_ASSISTANT]),
        "skipped_unknown_role": int(counts[UNKNOWN_ROLE]),
        "skipped_too_long": int(counts[TOO_LONG_SKIPPED]),
        "too_long": int((lengths > max_length).sum()),
        "truncated": int(counts[TRUNCATED]),
    }


class ChatSFTDataModule(pl.LightningDataModule):
    """Chat SFT batches (input_ids, attention_mask, labels) from ShareGPT-style conversations.

    `prepare_data` tokenises into the shared cache (see the module docstring); `setup` loads it.
    Validation: a named split (`val_split`, hub only), a file (`val_path`) or a seeded `val_fraction` of the
    training rows. After `setup()`, `self.stats` holds per-split counts: rows, kept, skipped (and why:
    skipped_no_assistant, skipped_unknown_role, skipped_too_long), too_long (rows over `max_length`,
    whatever happened to them) and truncated (too-long rows kept after truncation); train also has
    packed_rows when packing.
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
        too_long: str = "truncate",
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
        cache_dir: str | None = None,
        num_proc: int | None = None,
        map_batch_size: int = 1000,
    ):
        super().__init__()
        if not 0.0 <= float(val_fraction) < 1.0:
            raise LokiError(f"task.data.val_fraction must be in [0, 1), got {val_fraction}.")
        if too_long not in TOO_LONG_MODES:
            raise LokiError(f"task.data.too_long must be one of {', '.join(TOO_LONG_MODES)}, got {too_long!r}.")
        self.tokenizer = tokenizer
        self.source, self.path, self.split = source, path, split
        self.val_split, self.val_path, self.val_fraction = val_split, val_path, float(val_fraction)
        self.max_samples, self.max_length = max_samples, int(max_length)
        self.too_long = too_long
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size or batch_size)
        self.packing = bool(packing)
        # LLaMA-Factory lowers cutoff_len by one when packing; examples are cut to it and packed to it.
        self.cutoff = self.max_length - 1 if self.packing else self.max_length
        self.columns = dict(
            conversations_column=conversations_column,
            system_column=system_column,
            role_map=dict(role_map) if role_map else None,
            role_key=role_key,
            content_key=content_key,
        )
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
        self.num_proc = int(num_proc) if num_proc else None
        self.map_batch_size = int(map_batch_size)
        self.train_examples: ChatExamples | None = None
        self.val_examples: ChatExamples | list = []
        self.stats: dict[str, dict[str, int]] = {}
        self._fingerprint: str | None = None

    # -- the cache

    def _sources(self) -> list[tuple[str, str | None, str | None, str, str]]:
        """(name, source, path, split, override) for each separately tokenised input."""
        out = [("train", self.source, self.path, self.split, "task.data.path")]
        if self.val_path or self.val_split:
            out.append(("val", None if self.val_path else self.source, self.val_path, self.val_split or self.split, "task.data.val_path"))
        return out

    def cache_path(self, source: str | None, path: str | None, split: str, with_limit: bool = True) -> Path:
        """The cache directory for one input under the current settings."""
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        key = {
            "version": CACHE_VERSION,
            "tokenizer": self._fingerprint,
            "max_length": self.max_length,
            "cutoff": self.cutoff,
            "packing": self.packing,
            "too_long": self.too_long,
            "input": _source_identity(source, path, split),
            "max_samples": int(self.max_samples) if with_limit and self.max_samples is not None else None,
            **self.columns,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self.cache_root / "data" / f"chat-{digest}"

    def prepare_data(self) -> None:
        """Tokenise every input not yet in the cache (Lightning runs this on one process per node)."""
        for name, source, path, split, override in self._sources():
            limit = name == "train"
            target = self.cache_path(source, path, split, with_limit=limit)
            if (target / "manifest.json").is_file():
                log.info("%s data: cached tokens at %s", name, target)
                continue
            self._build(target, source, path, split, override, self.max_samples if limit else None)

    def _build(self, target: Path, source, path, split, override, max_samples) -> None:
        from datasets import Features, Sequence as Seq, Value

        columns = [self.columns["conversations_column"]] + ([self.columns["system_column"]] if self.columns["system_column"] else [])
        dataset, origin = load_rows(source, path, split, override=override, columns=columns)
        if max_samples is not None and int(max_samples) < len(dataset):
            dataset = dataset.select(range(int(max_samples)))  # the first rows: a stable subset
        if len(dataset) == 0:
            raise LokiError(f"chat data '{origin}' has no rows.")
        num_proc = self.num_proc or max(1, min(os.cpu_count() or 1, len(dataset) // 20_000))
        num_proc = min(num_proc, max(1, len(dataset)))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        started = time.perf_counter()
        try:
            features = Features(
                {
                    "input_ids": Seq(Value("int32")),
                    "labels": Seq(Value("int32")),
                    "length": Value("int32"),
                    "status": Value("int8"),
                }
            )
            tokenised = dataset.map(
                encode_batch,
                fn_kwargs=dict(tokenizer=self.tokenizer, max_length=self.cutoff, too_long=self.too_long, **self.columns),
                batched=True,
                batch_size=self.map_batch_size,
                num_proc=num_proc if num_proc > 1 else None,
                remove_columns=dataset.column_names,
                features=features,
                cache_file_name=str(tmp / "tokens.arrow"),
                load_from_cache_file=False,
                new_fingerprint=target.name,
                desc=f"tokenising {Path(origin).name}",
            )
            files = [Path(f["filename"]).name for f in tokenised.cache_files]
            status, lengths = _column(tokenised, "status"), _column(tokenised, "length")
            stats = _stats_from(status, lengths, self.cutoff)
            unknown = self._unknown_speakers(dataset, status)
            manifest = {
                "origin": origin,
                "files": files,
                "rows": len(tokenised),
                "stats": stats,
                "unknown_speakers": unknown,
                "seconds": round(time.perf_counter() - started, 3),
                "num_proc": num_proc,
            }
            del tokenised
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            try:
                os.rename(tmp, target)
            except OSError:  # another process or node finished the same cache first: keep theirs
                if not (target / "manifest.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("tokenised %d conversations from '%s' in %.1f s (%d processes) into %s", manifest["rows"], origin, manifest["seconds"], num_proc, target)

    def _unknown_speakers(self, dataset, status: np.ndarray, limit: int = 5) -> list[str]:
        rows = np.flatnonzero(status == UNKNOWN_ROLE)[:100]
        roles, key, speakers = self.columns["role_map"] or DEFAULT_ROLE_MAP, self.columns["role_key"], []
        column = self.columns["conversations_column"]
        for row in rows.tolist():
            conversation = dataset[row][column]
            if isinstance(conversation, str):
                conversation = json.loads(conversation)
            for turn in conversation or []:
                name = str(turn.get(key))
                if turn.get(key) not in roles and name not in speakers:
                    speakers.append(name)
            if len(speakers) >= limit:
                break
        return speakers[:limit]

    @staticmethod
    def _load(target: Path):
        from datasets import Dataset, concatenate_datasets

        manifest = json.loads((target / "manifest.json").read_text())
        parts = [Dataset.from_file(str(target / name)) for name in manifest["files"]]
        table = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        return table, manifest

    # -- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        loaded = {}
        for name, source, path, split, override in self._sources():
            target = self.cache_path(source, path, split, with_limit=name == "train")
            if not (target / "manifest.json").is_file():  # no prepare_data (a plain script or test): build it
                self._build(target, source, path, split, override, self.max_samples if name == "train" else None)
            loaded[name] = self._load(target)
        table, manifest = loaded["train"]
        status, lengths = _column(table, "status"), _column(table, "length")
        train_rows = np.arange(len(table))
        splits = {"train": (table, manifest, train_rows, status, lengths)}
        if "val" in loaded:
            val_table, val_manifest = loaded["val"]
            splits["val"] = (
                val_table,
                val_manifest,
                np.arange(len(val_table)),
                _column(val_table, "status"),
                _column(val_table, "length"),
            )
        elif self.val_fraction > 0 and len(table) > 1:
            order = list(range(len(table)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, int(round(self.val_fraction * len(table))))
            val_rows = np.array(sorted(order[:n_val]), dtype=np.int64)
            train_rows = np.array(sorted(order[n_val:]), dtype=np.int64)
            splits["train"] = (table, manifest, train_rows, status, lengths)
            splits["val"] = (table, manifest, val_rows, status, lengths)
        for name, (tab, man, rows, st, ln) in splits.items():
            examples = self._examples(name, tab, man, rows, st[rows], ln[rows])
            if name == "train":
                self.train_examples = examples
            else:
                self.val_examples = examples

    def _examples(self, name, table, manifest, rows, status, lengths) -> ChatExamples:
        stats = _stats_from(status, lengths, self.cutoff)
        self.stats[name] = stats
        origin = manifest["origin"]
        keep = rows[(status == KEPT) | (status == TRUNCATED)]
        message = (
            f"{name} data '{origin}': {stats['kept']} of {stats['rows']} conversations kept; skipped "
            f"{stats['skipped_no_assistant']} without an assistant turn, {stats['skipped_unknown_role']} with a "
            f"speaker not in the role map"
            + (f" ({', '.join(manifest.get('unknown_speakers') or [])}; add it with task.data.role_map)" if stats["skipped_unknown_role"] else "")
            + f", {stats['skipped_too_long']} too long ({self.too_long}); {stats['too_long']} longer than "
            f"{self.cutoff} tokens, {stats['truncated']} of them truncated"
        )
        (log.warning if stats["skipped"] or stats["too_long"] else log.info)(message)
        if not len(keep):
            raise LokiError(f"{name} data '{origin}' has no conversation with an assistant turn to train on.")
        if len(keep) == len(table) and np.array_equal(keep, np.arange(len(table))):
            kept = table.select_columns(["input_ids", "labels"])
        else:
            kept = table.select(keep).select_columns(["input_ids", "labels"])
        packs = None
        if self.packing and name == "train":
            kept_lengths = np.minimum(lengths[(status == KEPT) | (status == TRUNCATED)], self.cutoff)
            packs = []
            for start in range(0, len(kept_lengths), PACK_GROUP):
                group = kept_lengths[start : start + PACK_GROUP].tolist()
                packs += [[start + i for i in pack] for pack in knapsack_packs(group, self.cutoff)]
            stats["packed_rows"] = len(packs)
        return ChatExamples(kept, packs)

    def _collate(self, rows):
        return collate_right_padded(rows, pad_token_id(self.tokenizer))

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
