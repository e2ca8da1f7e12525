"""Rows in, chat messages out: reading a hub dataset or a local file, and mapping ShareGPT speakers to roles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loki.errors import LokiError

# ShareGPT speaker names -> chat-template roles. Conversations with unlisted names are skipped and counted.
# ToolACE's tool results (`from: tool`, LLaMA-Factory's `observation`) become the template's tool role.
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
_REPO_ROOT = Path(__file__).resolve().parents[3]


def resolve_path(path: str | Path) -> Path:
    """A user path as given if it exists (absolute or relative to the working directory), else relative
    to the repository root, so configs can name `tests/fixtures/...` from any working directory."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    in_repo = _REPO_ROOT / candidate
    return in_repo if in_repo.exists() else candidate


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


class UnknownSpeaker(LokiError):
    """A conversation turn whose speaker name is not in the role map."""

    def __init__(self, message: str, speaker: Any = None):
        super().__init__(message)
        self.speaker = speaker


def to_messages(
    conversation: Sequence[Mapping[str, Any]],
    system: str | None = None,
    role_map: Mapping[str, str] | None = None,
    role_key: str = "from",
    content_key: str = "value",
) -> list[dict[str, str]]:
    """ShareGPT turns as chat messages; a non-empty `system` (from the system column) goes first.

    Every content is a string, as the data stores it: a tool result such as ToolACE's `[{"name": ...}]`
    stays the text it is (see `templates.py` for templates that would JSON-encode it again). A speaker the
    role map does not know is an `UnknownSpeaker` (the data module skips the row and counts it)."""
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
