"""Conversations to token ids with the loss on assistant tokens only, cut to length as LLaMA-Factory cuts.

Loss masks come from rendering prefixes of the conversation with the model's own chat template, so they
work for templates without `{% generation %}` tags (Qwen2.5's and Llama-3.1's ship none): for assistant
turn i, the text rendered for `messages[:i]` with the generation prompt ends where the assistant's content
starts; the trained span runs from there through the first end-of-turn token (`tokenizer.eos_token`) after
the content (or to the end of the turn's rendering if it has none). The text is then tokenised segment by
segment, so every token is either fully inside or outside a span.

Too-long rows (`too_long: truncate`, LLaMA-Factory's rule): the conversation is cut turn pair by turn
pair; each (prompt, answer) pair gets the token budget left after the earlier pairs, split by
`split_budget`; pairs after the budget is spent are dropped. A row whose truncation leaves no assistant
token is skipped. With `too_long: drop` every too-long row is skipped. Both are counted by outcome code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from loki.data.chat.messages import DEFAULT_ROLE_MAP, UnknownSpeaker, to_messages
from loki.errors import LokiError

IGNORE_INDEX = -100  # the label HF causal LMs skip in their loss
TOO_LONG_MODES = ("truncate", "drop")

# Per-row outcome codes stored in the cache (column `status`).
KEPT, TRUNCATED, NO_ASSISTANT, UNKNOWN_ROLE, TOO_LONG_SKIPPED = 0, 1, 2, 3, 4


def _render(tokenizer, messages: list[dict], generation_prompt: bool, chat_template: str | None = None) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_segments(tokenizer, messages: list[dict], chat_template: str | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_trained) pieces that concatenate to the full text.

    `chat_template`: render with this template instead of the tokenizer's own (see `templates.py`)."""
    full = _render(tokenizer, messages, False, chat_template)
    eos = tokenizer.eos_token
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], True, chat_template)
        # the last turn rendered through is the whole conversation: no third rendering
        through_text = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False, chat_template)
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
    chat_template: str | None = None,
) -> dict[str, list]:
    """A batched `Dataset.map` function: one output row per input row, with `input_ids`, `labels` (empty
    for a skipped row), `length` (tokens before truncation) and `status` (the outcome code). The texts of
    the whole batch go to the tokenizer in one call; the template writes any BOS itself, so
    `add_special_tokens=False` keeps it from appearing twice."""
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
        row_segments.append(assistant_segments(tokenizer, messages, chat_template))
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
