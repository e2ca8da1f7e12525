"""Chat SFT data: ShareGPT-style `conversations` -> token ids with the loss on assistant tokens only.

One path for every chat task (the LB reranker, ToolACE, the toy tasks): a hub id (`source`) or a local
.jsonl/.json/.parquet file in the same schema (`path`) goes through `datasets.load_dataset`. The steps,
one module each:

- `messages`: reading the rows (only the columns used) and mapping ShareGPT speakers to roles;
- `templates`: the chat template training text is rendered with (the tokenizer's own, except that
  Llama-3.1's tool branch inserts string tool results raw, as LLaMA-Factory's llama3 template does);
- `tokenise`: rendering, assistant-only loss masks, LLaMA-Factory's pair-by-pair truncation;
- `packing`: LLaMA-Factory's greedy knapsack packing and the packed rows;
- `cache`: the Arrow token cache and its key;
- `config`: `ChatDataConfig`, every setting typed and checked;
- `datamodule`: `ChatSFTDataModule` (lazily imported here: it is the only part that needs Lightning).

Rows longer than the cutoff are counted (`stats[split]["too_long"]`) and never dropped silently.
"""

from __future__ import annotations

from loki.data.chat.cache import CACHE_VERSION, default_cache_root, tokenizer_fingerprint
from loki.data.chat.config import ChatDataConfig
from loki.data.chat.messages import (
    DEFAULT_ROLE_MAP,
    UnknownSpeaker,
    hub_load_error,
    load_hub,
    load_rows,
    resolve_path,
    to_messages,
)
from loki.data.chat.packing import PACK_GROUP, ChatExamples, concat_examples, knapsack_packs, pack_groups
from loki.data.chat.templates import renders_tool_results_raw, training_chat_template
from loki.data.chat.tokenise import (
    IGNORE_INDEX,
    KEPT,
    NO_ASSISTANT,
    TOO_LONG_MODES,
    TOO_LONG_SKIPPED,
    TRUNCATED,
    UNKNOWN_ROLE,
    assemble,
    assistant_segments,
    encode_batch,
    split_budget,
)

_LAZY = {"ChatSFTDataModule", "collate_right_padded"}  # need lightning: imported on first use


def __getattr__(name: str):
    if name in _LAZY:
        from loki.data.chat import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CACHE_VERSION", "DEFAULT_ROLE_MAP", "IGNORE_INDEX", "KEPT", "NO_ASSISTANT", "PACK_GROUP", "TOO_LONG_MODES",
    "TOO_LONG_SKIPPED", "TRUNCATED", "UNKNOWN_ROLE", "ChatDataConfig", "ChatExamples", "ChatSFTDataModule",
    "UnknownSpeaker", "assemble", "assistant_segments", "collate_right_padded", "concat_examples",
    "default_cache_root", "encode_batch", "hub_load_error", "knapsack_packs", "load_hub", "load_rows",
    "pack_groups", "renders_tool_results_raw", "resolve_path", "split_budget", "to_messages",
    "tokenizer_fingerprint", "training_chat_template",
]
