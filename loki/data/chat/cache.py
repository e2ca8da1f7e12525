"""The token cache: conversations tokenised once into Arrow files, found again by a key of the settings.

Tokenisation happens once, in `prepare_data` (one process per node), with a batched
`datasets.Dataset.map` (`num_proc` processes, one tokenizer call per batch of segments). The result is a
set of Arrow files under `<cache_dir>/data/chat-<key>/`, where the key (`settings_digest`, 20 characters)
hashes everything that changes the tokens: the tokenizer (its serialised vocab/merges/normalisers, or its
vocab for a slow one), the chat template it renders with and the end-of-turn token, `max_length`, the
cutoff, `too_long`, `packing`, the input (a local file's absolute path, size and mtime; or the hub id and
split), `max_samples` and the column and role settings. `manifest.json` is written last and the directory
renamed into place, so a half-written cache is never read; ranks, later runs and sweep jobs reuse it.
Only the conversations column and the optional system column are read: parquet files and parquet-backed
hub datasets never read the others from disk; JSON is parsed by Arrow and the unused columns are dropped
before any row reaches Python.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from loki.data.chat import tokenise
from loki.data.chat.config import ChatDataConfig
from loki.data.chat.messages import DEFAULT_ROLE_MAP, load_rows, resolve_path
from loki.data.chat.tokenise import KEPT, NO_ASSISTANT, TOO_LONG_SKIPPED, TRUNCATED, UNKNOWN_ROLE
from loki.errors import LokiError
from loki.files import settings_digest

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cached layout or the tokenisation rules change
KEY_LENGTH = 20  # hex characters of the cache key (kept: existing caches keep their names)


def tokenizer_fingerprint(tokenizer, chat_template: str | None = None) -> str:
    """A hash of what decides the tokens: the serialised fast tokenizer (vocab, merges, normalisers,
    added tokens) or a slow one's vocab, its class, the chat template and the end-of-turn token.

    `chat_template`: the template the data is rendered with when it is not the tokenizer's own."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = chat_template if chat_template is not None else tokenizer.chat_template
    template = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    for part in (type(tokenizer).__name__, template or "", str(tokenizer.eos_token)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def default_cache_root() -> Path:
    """`$LOKI_CACHE`, else ~/.cache/loki: the default of `paths.cache_dir`."""
    return Path(os.environ.get("LOKI_CACHE") or Path.home() / ".cache" / "loki")


def source_identity(source: str | None, path: str | None, split: str) -> dict:
    """What names one input in the key: a local file's absolute path, size and mtime, or the hub id and split."""
    if path:
        file = resolve_path(path)
        if not file.is_file():
            raise LokiError(f"chat data file '{path}' does not exist.")
        stat = file.stat()
        return {"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"source": source, "split": split}


def cache_key(config: ChatDataConfig, fingerprint: str, source: str | None, path: str | None, split: str, max_samples: int | None) -> dict:
    """The settings the cached tokens depend on (the same dict, key for key, as before the package split)."""
    return {
        "version": CACHE_VERSION,
        "tokenizer": fingerprint,
        "max_length": config.max_length,
        "cutoff": config.cutoff,
        "packing": config.packing,
        "too_long": config.too_long,
        "input": source_identity(source, path, split),
        "max_samples": max_samples,
        **config.columns,
    }


def cache_dir(root: Path, key: dict) -> Path:
    return Path(root) / "data" / f"chat-{settings_digest(key, length=KEY_LENGTH)}"


def build(
    target: Path,
    tokenizer,
    config: ChatDataConfig,
    source: str | None,
    path: str | None,
    split: str,
    override: str,
    max_samples: int | None,
    chat_template: str | None = None,
) -> None:
    """Tokenise one input into `target` (Arrow files and `manifest.json`), atomically."""
    from datasets import Features, Sequence, Value

    columns = config.columns
    wanted = [config.conversations_column] + ([config.system_column] if config.system_column else [])
    dataset, origin = load_rows(source, path, split, override=override, columns=wanted)
    if max_samples is not None and int(max_samples) < len(dataset):
        dataset = dataset.select(range(int(max_samples)))  # the first rows: a stable subset
    if len(dataset) == 0:
        raise LokiError(f"chat data '{origin}' has no rows.")
    num_proc = config.num_proc or max(1, min(os.cpu_count() or 1, len(dataset) // 20_000))
    num_proc = min(num_proc, max(1, len(dataset)))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        features = Features(
            {
                "input_ids": Sequence(Value("int32")),
                "labels": Sequence(Value("int32")),
                "length": Value("int32"),
                "status": Value("int8"),
            }
        )
        tokenised = dataset.map(
            tokenise.encode_batch,  # looked up here, so a test can replace it
            fn_kwargs=dict(
                tokenizer=tokenizer, max_length=config.cutoff, too_long=config.too_long, chat_template=chat_template, **columns
            ),
            batched=True,
            batch_size=config.map_batch_size,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=dataset.column_names,
            features=features,
            cache_file_name=str(tmp / "tokens.arrow"),
            load_from_cache_file=False,
            new_fingerprint=target.name,
            desc=f"tokenising {Path(origin).name}",
        )
        files = [Path(f["filename"]).name for f in tokenised.cache_files]
        status, lengths = column(tokenised, "status"), column(tokenised, "length")
        manifest = {
            "origin": origin,
            "files": files,
            "rows": len(tokenised),
            "stats": stats_from(status, lengths, config.cutoff),
            "unknown_speakers": _unknown_speakers(dataset, status, config),
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
    log.info(
        "tokenised %d conversations from '%s' in %.1f s (%d processes) into %s",
        manifest["rows"], origin, manifest["seconds"], num_proc, target,
    )


def load(target: Path):
    """The cached table (memory-mapped) and its manifest."""
    from datasets import Dataset, concatenate_datasets

    manifest = json.loads((target / "manifest.json").read_text())
    parts = [Dataset.from_file(str(target / name)) for name in manifest["files"]]
    table = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return table, manifest


def column(table, name: str) -> np.ndarray:
    """One scalar column as a numpy array, straight from Arrow (row iteration is ~100x slower)."""
    return np.asarray(table.select_columns([name]).with_format("arrow")[:][name].to_numpy())


def stats_from(status: np.ndarray, lengths: np.ndarray, max_length: int) -> dict[str, int]:
    """Per-split counts from the outcome codes and untruncated lengths."""
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


def _unknown_speakers(dataset, status: np.ndarray, config: ChatDataConfig, limit: int = 5) -> list[str]:
    """The first few speaker names not in the role map, for the log line that says what to add."""
    rows = np.flatnonzero(status == UNKNOWN_ROLE)[:100]
    roles, key, speakers = config.role_map or DEFAULT_ROLE_MAP, config.role_key, []
    for row in rows.tolist():
        conversation = dataset[row][config.conversations_column]
        if isinstance(conversation, str):
            conversation = json.loads(conversation)
        for turn in conversation or []:
            name = str(turn.get(key))
            if turn.get(key) not in roles and name not in speakers:
                speakers.append(name)
        if len(speakers) >= limit:
            break
    return speakers[:limit]
