"""`ChatDataConfig`: every setting of the chat SFT loader (the YAML `task.data` block), typed and checked.

Each check raises one sentence naming the key, the value given and what is allowed, when the config is
made: before any row is read or tokenised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loki import checks
from loki.data.chat.tokenise import TOO_LONG_MODES
from loki.errors import LokiError

_KEY = "task.data"


@dataclass
class ChatDataConfig:
    source: str | None = None  # hub dataset id; read when `path` is null
    path: str | None = None  # a local .jsonl/.json/.parquet file in the same schema (wins over `source`)
    split: str = "train"  # hub split to train on
    val_split: str | None = None  # hub split for validation (with `source`)
    val_path: str | None = None  # a local validation file
    val_fraction: float = 0.0  # share of training rows held out for validation when no split/file is named
    max_samples: int | None = None  # keep the first N training rows (None: all)
    max_length: int = 1024  # tokens per example (packed rows: max_length - 1, as LLaMA-Factory packs)
    too_long: str = "truncate"  # longer rows: LLaMA-Factory's pair-by-pair cut, or drop; counted either way
    batch_size: int = 8  # training examples (or packed rows) per step
    eval_batch_size: int | None = None  # validation batch size (None: batch_size)
    packing: bool = False  # LLaMA-Factory's greedy knapsack packing of training examples
    conversations_column: str = "conversations"  # column holding the list of turns
    system_column: str | None = None  # column with a system prompt put first (None: none)
    role_map: dict[str, str] | None = None  # speaker name -> chat-template role (None: messages.DEFAULT_ROLE_MAP)
    role_key: str = "from"  # key of the speaker name in a turn
    content_key: str = "value"  # key of the text in a turn
    seed: int = 0  # seeds the validation hold-out and the training order
    num_workers: int = 0  # DataLoader workers
    cache_dir: str | None = None  # tokens cached under <cache_dir>/data/ (None: $LOKI_CACHE or ~/.cache/loki)
    num_proc: int | None = None  # tokenising processes (None: one per 20k rows, at most the CPU count)
    map_batch_size: int = 1000  # rows per tokenizer call when tokenising

    def __post_init__(self) -> None:
        for name in ("source", "path", "val_split", "val_path", "system_column", "cache_dir"):
            checks.text(f"{_KEY}.{name}", getattr(self, name), optional=True)
        for name in ("split", "conversations_column", "role_key", "content_key"):
            checks.text(f"{_KEY}.{name}", getattr(self, name))
        if self.source is None and self.path is None:
            checks.fail(f"{_KEY}.source", f"a hub dataset id when {_KEY}.path is null", self.source)
        self.val_fraction = float(checks.number(f"{_KEY}.val_fraction", self.val_fraction, 0, 1, high_open=True))
        checks.one_of(f"{_KEY}.too_long", self.too_long, TOO_LONG_MODES)
        checks.boolean(f"{_KEY}.packing", self.packing)
        # packing cuts examples to max_length - 1, which must leave at least one token
        checks.integer(f"{_KEY}.max_length", self.max_length, low=2 if self.packing else 1)
        checks.integer(f"{_KEY}.batch_size", self.batch_size, low=1)
        checks.integer(f"{_KEY}.eval_batch_size", self.eval_batch_size, low=1, optional=True)
        checks.integer(f"{_KEY}.max_samples", self.max_samples, low=1, optional=True)
        checks.integer(f"{_KEY}.seed", self.seed)
        checks.integer(f"{_KEY}.num_workers", self.num_workers, low=0)
        checks.integer(f"{_KEY}.num_proc", self.num_proc, low=1, optional=True)
        checks.integer(f"{_KEY}.map_batch_size", self.map_batch_size, low=1)
        self.role_map = _role_map(self.role_map)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ChatDataConfig:
        """The config from the `task.data` keys (a dict or an OmegaConf node); an unknown key is refused."""
        known = [f.name for f in dataclasses.fields(cls)]
        for name in settings:
            if name not in known:
                raise LokiError(f"{_KEY} has no setting '{name}'; the chat loader's settings are {', '.join(known)}.")
        return cls(**dict(settings))

    @property
    def cutoff(self) -> int:
        """Tokens per example: LLaMA-Factory lowers cutoff_len by one when packing."""
        return self.max_length - 1 if self.packing else self.max_length

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size

    @property
    def columns(self) -> dict[str, Any]:
        """The settings that decide how a row becomes messages (`tokenise.encode_batch`'s keywords)."""
        return dict(
            conversations_column=self.conversations_column,
            system_column=self.system_column,
            role_map=self.role_map,
            role_key=self.role_key,
            content_key=self.content_key,
        )


def _role_map(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        checks.fail(f"{_KEY}.role_map", "a mapping of speaker names to roles (or null)", value)
    roles = {str(speaker): role for speaker, role in value.items()}
    for speaker, role in roles.items():
        checks.text(f"{_KEY}.role_map.{speaker}", role, what="a chat-template role such as user, assistant or tool")
    return roles or None  # an empty map means the default one, as null does
