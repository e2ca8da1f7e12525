"""MMLU (`cais/mmlu`) rows and the zero-shot lettered multiple-choice prompt built from them.

Rows keep the hub schema - `question` (str), `subject` (str), `choices` (4 str), `answer` (int 0-3) - plus
a stable string `id` = f"{subject}/{i}", where `i` counts that subject's rows in split order. Counting per
subject (not over the whole split) keeps an id the same whether the rows come from the hub's "all"
config, a per-subject file or a filtered local copy, so attribution shards and resumes stay keyed alike.

Selection is deterministic: `per_subject` keeps the FIRST N rows of each subject in split order (no
sampling, so a larger N only adds rows); `max_samples` then keeps a `seed`-ed random subset of those,
returned in split order, so a small cap still spans many subjects.
"""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loki.data.chat import resolve_path  # as given if it exists, else relative to the repo root
from loki.errors import LokiError

LETTERS = "ABCD"
REQUIRED_COLUMNS = ("question", "subject", "choices", "answer")
INSTRUCTION = "Answer with the letter of the correct option."
PROMPT_FORMAT = "mmlu-zero-shot-lettered-v1"  # recorded in attribution metadata; bump when the prompt changes

# Local files are read by the `datasets` packaged builder for their extension.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _local_dataset(path: Path, split: str):
    from datasets import load_dataset

    if not path.exists():
        raise LokiError(f"MMLU data path '{path}' does not exist.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS and p.is_file())
        split_files = [p for p in files if p.name.split(".")[0].split("-")[0] == split]
        files = split_files or files  # a dir of one unnamed split is read whole
        if not files:
            raise LokiError(f"MMLU data dir '{path}' holds no .jsonl/.json/.parquet/.csv file.")
    else:
        files = [path]
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if None in builders or len(builders) != 1:
        raise LokiError(f"MMLU data path '{path}' must hold files of one type among .jsonl, .json, .parquet, .csv.")
    return load_dataset(builders.pop(), data_files={split: [str(p) for p in files]}, split=split), str(path)


def _hub_dataset(source: str, split: str):
    from datasets import load_dataset

    try:
        return load_dataset(source, "all", split=split), source
    except Exception as err:  # offline, unknown name, no such split: all mean "use local files"
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise LokiError(
            f"could not load MMLU dataset '{source}' split '{split}' ({reason}); "
            f"pass data.path=/path/to/mmlu/{split}.jsonl (or a dir of .jsonl/.parquet/.csv files) to read local files."
        ) from None


def _as_choices(value: Any, where: str) -> list[str]:
    if isinstance(value, str):  # CSV cells hold the list as text
        try:
            value = json.loads(value)
        except ValueError:
            value = ast.literal_eval(value)
    choices = [str(c) for c in value]
    if len(choices) != len(LETTERS):
        raise LokiError(f"{where} has {len(choices)} choices; MMLU rows need exactly {len(LETTERS)}.")
    return choices


def _as_answer(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS and len(value.strip()) == 1:
        return LETTERS.index(value.strip().upper())
    try:
        answer = int(value)
    except (TypeError, ValueError):
        answer = -1
    if not 0 <= answer < len(LETTERS):
        raise LokiError(f"{where} has answer {value!r}; it must be an int 0-3 (or a letter A-D).")
    return answer


def load_mmlu(
    source: str = "cais/mmlu",
    path: str | Path | None = None,
    split: str = "test",
    subjects: Sequence[str] | None = None,
    per_subject: int | None = 50,
    max_samples: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """MMLU rows with ids; `path` (a local file or dir in the hub schema) replaces the hub `source`.

    A relative `path` is read from the working directory if it exists there, else from the repo root.

    `subjects=None` keeps all subjects; `per_subject=None` (or <= 0) keeps every row of a subject.
    """
    dataset, origin = _local_dataset(resolve_path(path), split) if path else _hub_dataset(source, split)
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise LokiError(f"MMLU data '{origin}' has no column '{missing[0]}' (needs {', '.join(REQUIRED_COLUMNS)}).")
    wanted = set(subjects) if subjects else None
    if wanted is not None:
        unknown = sorted(wanted - set(dataset.unique("subject")))
        if unknown:
            raise LokiError(f"MMLU data '{origin}' has no subject '{unknown[0]}'.")
    cap = per_subject if per_subject and per_subject > 0 else None

    rows: list[dict] = []
    seen_per_subject: dict[str, int] = {}
    for row in dataset:
        subject = str(row["subject"])
        index = seen_per_subject.get(subject, 0)
        seen_per_subject[subject] = index + 1
        if (wanted is not None and subject not in wanted) or (cap is not None and index >= cap):
            continue
        sample_id = f"{subject}/{index}"
        where = f"MMLU row '{sample_id}' of '{origin}'"
        rows.append(
            {
                "id": sample_id,
                "subject": subject,
                "question": str(row["question"]),
                "choices": _as_choices(row["choices"], where),
                "answer": _as_answer(row["answer"], where),
            }
        )
    if max_samples is not None and 0 <= max_samples < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), max_samples))
        rows = [rows[i] for i in keep]
    if not rows:
        raise LokiError(f"MMLU data '{origin}' split '{split}' gave no rows after the subject and size caps.")
    return rows


def mc_messages(example: dict, with_system: str | None = None) -> list[dict]:
    """The zero-shot lettered multiple-choice prompt as chat messages (optionally after a system message)."""
    subject = str(example.get("subject", "")).replace("_", " ").strip()
    header = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, example["choices"]))
    messages = [{"role": "system", "content": with_system}] if with_system else []
    messages.append({"role": "user", "content": f"{header}{example['question']}\n{options}\n{INSTRUCTION}"})
    return messages


def _prompt_text(tokenizer, example: dict, with_system: str | None) -> str:
    return tokenizer.apply_chat_template(mc_messages(example, with_system), add_generation_prompt=True, tokenize=False)


def _encode(tokenizer, text: str) -> list[int]:
    # The chat template already wrote any BOS into the text; do not add it twice.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def mc_prompt_ids(tokenizer, example: dict, with_system: str | None = None) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant generation prompt."""
    return _encode(tokenizer, _prompt_text(tokenizer, example, with_system))


def letter_token_ids(tokenizer, example: dict | None = None, with_system: str | None = None) -> list[int]:
    """Ids of A-D as the model would emit each right after the generation prompt (each must be one token)."""
    example = example or {"subject": "", "question": "?", "choices": ["a", "b", "c", "d"], "answer": 0}
    from loki.tokenizer import single_token_ids

    return single_token_ids(tokenizer, _prompt_text(tokenizer, example, with_system), LETTERS, "answer letter")


def answer_token_id(tokenizer, example: dict, with_system: str | None = None) -> int:
    """Id of the gold answer letter as the model would emit it after the generation prompt."""
    return letter_token_ids(tokenizer, example, with_system)[int(example["answer"])]
