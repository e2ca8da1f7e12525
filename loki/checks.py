"""One-sentence value checks: the key, the value given, what is allowed.

Plain functions over plain values, used by `loki.config` (the dotted keys of a composed config) and by
the typed schemas' `__post_init__` (`loki.schema`, `loki.tasks`). Each raises `LokiError` with
"<key> must be <allowed>, got <value>." and returns the value when it is fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loki.errors import LokiError


def fail(key: str, allowed: str, value: Any) -> None:
    raise LokiError(f"{key} must be {allowed}, got {value!r}.")


def one_of(key: str, value: Any, choices: Sequence[Any], optional: bool = False) -> Any:
    if (value is None and optional) or value in choices:
        return value
    fail(key, "one of " + ", ".join(map(str, choices)) + (" (or null)" if optional else ""), value)


def boolean(key: str, value: Any, optional: bool = False) -> Any:
    if (value is None and optional) or isinstance(value, bool):
        return value
    fail(key, "true or false" + (" (or null)" if optional else ""), value)


def integer(key: str, value: Any, low: int | None = None, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        allowed = "an integer" + (f" >= {low}" if low is not None else "") + (" (or null)" if optional else "")
        fail(key, allowed, value)
    return value


def number(
    key: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False, optional: bool = False
) -> Any:
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        fail(key, f"a number in {interval}" + (" (or null)" if optional else ""), value)
    return value


def positive(key: str, value: Any, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        fail(key, "a positive number" + (" (or null)" if optional else ""), value)
    return value


def text(key: str, value: Any, optional: bool = False, what: str = "a non-empty string") -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        fail(key, what + (" (or null)" if optional else ""), value)
    return value


def string_list(key: str, value: Any, optional: bool = True) -> Any:
    if value is None and optional:
        return None
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
        fail(key, "a list of names" + (" (or null)" if optional else ""), value)
    return value


def int_list(key: str, value: Any, low: int = 1) -> Any:
    if not (
        isinstance(value, (list, tuple)) and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)
    ):
        fail(key, f"a non-empty list of integers >= {low}", value)
    return value


# ------------------------------------------------------------------------------- where a schema sits

# A schema's `__post_init__` names its fields relative to where the node sits in the composed config
# (`eval.benchmarks.mmlu.mode`, `task.eval.primary`); the validator that builds it says where.
import contextlib  # noqa: E402
from contextvars import ContextVar  # noqa: E402

_PREFIX: ContextVar[str] = ContextVar("loki_schema_prefix", default="")


@contextlib.contextmanager
def located(prefix: str):
    """Inside this block, `key(name)` is `<prefix>.<name>`."""
    token = _PREFIX.set(prefix)
    try:
        yield
    finally:
        _PREFIX.reset(token)


def key(name: str) -> str:
    prefix = _PREFIX.get()
    return f"{prefix}.{name}" if prefix else name
