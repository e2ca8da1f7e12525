"""Writing files safely when several processes (DDP ranks, sweep jobs, test workers) share a cache:
an exclusive lock, an atomic file write, and an atomic move of a finished directory into place; and the
one digest that names a cache entry after the settings it was made under (`settings_digest`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike):
    """Hold an exclusive advisory lock on `lock_path` (created if missing) for the `with` block."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def try_lock(lock_path: str | os.PathLike):
    """Try to take an exclusive advisory lock on `lock_path` (created if missing) without waiting: yields
    True (held for the `with` block) or False (another process holds it). The system drops the lock of a
    process that dies, so a claim left by a crashed process is free again."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary sibling, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a finished temporary directory into place (atomic on one filesystem), replacing an old one."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def settings_digest(obj, length: int = 16) -> str:
    """The project's cache key: sha256 of `obj` as sorted-key JSON (anything JSON cannot encode as its
    str()), hex, cut to `length` characters. Equal settings give the same key in every process."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
