"""The attribution score store: where it lives, what it was made from, and its shards.

Plain torch and safetensors (no Lightning). One store holds the KVA scores of one model under one set of
settings; `attribute.py` writes it and `train.py` (`loki.scores=auto`) reads it.

Layout of `<cache>/attribution/<model name>/<settings key>/`:
    meta.json            settings + model identity; a restart with different ones is refused
    shards/*.safetensors one file per (rank, session, batch): tensor `scores` [n, L, D] float32 and the
                         sample ids as JSON in the safetensors metadata (`ids`); written atomically
    complete.json        written by rank 0 once every sample of the run is present
    heatmap.png          where the lowest/highest q rows sit per layer

The settings key is a digest of the KVA settings and the prompt sample, both known before any model is
loaded, so `attribute.py` and `train.py` find the same directory for the same settings, and other settings
never share one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from loki import arch
from loki.errors import LokiError
from loki.files import settings_digest, write_atomic

FORMAT_VERSION = 2  # 2: settings-keyed directories, dtype-independent weight fingerprints, KVA recipe
META_FILE, COMPLETE_FILE, SHARD_DIR, HEATMAP_FILE = "meta.json", "complete.json", "shards", "heatmap.png"
# What a store's scores depend on, among the settings (model identity and tokenizer are checked apart).
KVA_KEYS = ("recipe", "steps", "scope", "objective", "times_activation", "target")
DATA_KEYS = ("source", "path", "split", "subjects", "offset", "per_subject", "max_samples", "seed", "prompt", "system_prompt")


def safe_name(model_name: str) -> str:
    """A model name as one directory name: `Qwen/Qwen2.5-0.5B-Instruct` -> `Qwen--Qwen2.5-0.5B-Instruct`."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", str(model_name).replace("/", "--")).strip(".") or "model"


def settings_record(kva: dict, data: dict) -> dict:
    """The settings part of a store's identity, as recorded in meta.json."""
    return {"kva": {k: kva.get(k) for k in KVA_KEYS}, "data": {k: data.get(k) for k in DATA_KEYS}}


def settings_key(kva: dict, data: dict) -> str:
    """`<recipe>-<scope>-<digest>`: readable at a glance, unique per settings."""
    record = _json_ready(settings_record(kva, data))
    digest = settings_digest(record, 12)
    return f"{kva.get('recipe') or 'paper'}-{kva.get('scope')}-{digest}"


def store_dir(cache_dir: str | Path, model_name: str, kva: dict, data: dict) -> Path:
    """The one place that says where a store lives: the attribution stage writes there, train.py reads there."""
    return Path(cache_dir).expanduser() / "attribution" / safe_name(model_name) / settings_key(kva, data)


def id_sort_key(sample_id: str) -> tuple:
    """Natural order: 'astronomy/2' before 'astronomy/10'; the store's deterministic sample order."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", sample_id))


# ------------------------------------------------------------------------------------------------ identity


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_identity(model: torch.nn.Module, model_name: str) -> dict:
    """Name, a hash of the architecture config and a fingerprint of the weights.

    Independent of the dtype the weights were loaded in: the dtype keys leave the config hash, and the
    fingerprint hashes evenly spaced samples of a few tensors after rounding them to bfloat16, so fp32
    weights and their bf16 copy (attribute in fp32, train in bf16) give the same fingerprint, while any
    training that moves weights by more than bf16's resolution changes it.
    """
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    fingerprint = hashlib.sha256()
    named = dict(model.named_parameters())
    projs = arch.down_projs(model)
    picked = [("embed", model.get_input_embeddings().weight)] if hasattr(model, "get_input_embeddings") else []
    picked += [(f"down_proj.{i}", projs[i].weight) for i in sorted({0, len(projs) // 2, len(projs) - 1})]
    picked += [("last_param", next(reversed(named.values())))] if named else []
    for label, tensor in picked:
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)  # ~4k evenly spaced values per tensor: cheap even for 8B models
        sample = flat[::stride][:4096].to(torch.bfloat16).float().cpu().contiguous()
        fingerprint.update(f"{label}:{tuple(tensor.shape)}".encode())
        fingerprint.update(sample.numpy().tobytes())
    return {
        "name": str(model_name),
        "config_sha256": _sha256(json.dumps(config, sort_keys=True, default=str).encode()),
        "weights_fingerprint": fingerprint.hexdigest(),
    }


def prompt_identity(tokenizer: Any, prompt_format: str, system_prompt: str | None) -> dict:
    """What the prompts' token ids depend on beyond the settings: the format, the template and the vocabulary."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "format": prompt_format,
        "system_prompt": system_prompt,
        "chat_template_sha256": _sha256(
            template.encode() if isinstance(template, str) else json.dumps(template, sort_keys=True).encode()
        ),
        "tokenizer_size": len(tokenizer),
    }


def store_meta(model: torch.nn.Module, tokenizer: Any, model_name: str, kva: dict, data: dict, prompt_format: str) -> dict:
    """Everything the scores depend on; two runs may share a store only if these are equal."""
    d = arch.dims(model)
    return {
        "format_version": FORMAT_VERSION,
        "shape": [d.num_layers, d.hidden_size],
        "model": model_identity(model, model_name),
        "prompt": prompt_identity(tokenizer, prompt_format, data.get("system_prompt")),
        **settings_record(kva, data),
    }


def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first difference between two JSON-like values, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def check_meta(out_dir: str | Path, stored: dict, wanted: dict) -> None:
    """LokiError naming the first difference if a store was made with another model or other settings."""
    diff = first_difference(_json_ready(stored), _json_ready(wanted))
    if diff:
        key, there, here = diff
        what = "another model" if key.startswith("model.") or key == "shape" else "other settings"
        raise LokiError(
            f"{out_dir} holds attribution scores made with {what} ({key} is {there!r} there but {here!r} now); "
            "pass another out_dir, give the model another model.name, or delete that directory to start over."
        )


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples -> lists, paths -> str: compare as stored


def prepare_store(out_dir: str | Path, meta: dict, write: bool = True) -> Path:
    """Create the store, or check that an existing one was made with the same settings and model."""
    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    if meta_path.exists():
        check_meta(out_dir, json.loads(meta_path.read_text()), meta)
    elif write:
        (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        write_atomic(meta_path, json.dumps(_json_ready(meta), indent=2, sort_keys=True).encode())
    return out_dir


# ------------------------------------------------------------------------------------------------ shards


def write_shard(out_dir: str | Path, name: str, ids: Sequence[str], scores: torch.Tensor) -> Path:
    """One atomic shard file: a crash leaves either the whole file or nothing (plus an ignored .tmp)."""
    from safetensors.torch import save_file

    shard_dir = Path(out_dir) / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    path = shard_dir / f"{name}.safetensors"
    tmp = shard_dir / f".tmp-{name}.safetensors"
    save_file({"scores": scores.detach().float().cpu().contiguous()}, str(tmp), metadata={"ids": json.dumps(list(ids))})
    os.replace(tmp, path)
    return path


def shard_ids(path: Path) -> list[str]:
    """The sample ids one shard holds, in row order."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("ids", "[]"))


def stored_ids(out_dir: str | Path) -> set[str]:
    """Ids already in a store's shards (empty if there is no store yet)."""
    shard_dir = Path(out_dir) / SHARD_DIR
    if not shard_dir.exists():
        return set()
    return {i for shard in shard_dir.glob("*.safetensors") if not shard.name.startswith(".tmp-") for i in shard_ids(shard)}


def mark_complete(out_dir: str | Path, expected_ids: Iterable[str]) -> None:
    """Write complete.json once every expected sample is in the shards; LokiError naming one that is not."""
    store = ScoreStore(out_dir)
    missing = set(expected_ids) - set(store.ids())
    if missing:
        first = min(missing, key=id_sort_key)
        raise LokiError(
            f"{len(missing)} samples (e.g. '{first}') are missing from {out_dir} after the run; rerun to finish them."
        )
    record = {
        "num_samples": store.num_samples,
        "ids_sha256": _sha256("\n".join(store.ids()).encode()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_atomic(Path(out_dir) / COMPLETE_FILE, json.dumps(record, indent=2).encode())


class ScoreStore:
    """Read access to a store: ids, [n, L, D] float32 chunks in natural id order, settings.

    A sample written twice (DDP samplers pad with repeats; a rerun may rewrite one) counts once: the copy
    in the first shard by file name wins.
    """

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        meta_path = self.dir / META_FILE
        if not meta_path.exists():
            raise LokiError(f"{self.dir} is not an attribution store (no {META_FILE}); run attribute.py first.")
        self.meta = json.loads(meta_path.read_text())
        self._where: dict[str, tuple[Path, int]] = {}
        for shard in sorted((self.dir / SHARD_DIR).glob("*.safetensors")):
            if shard.name.startswith(".tmp-"):
                continue
            for row, sample_id in enumerate(shard_ids(shard)):
                self._where.setdefault(sample_id, (shard, row))
        self._ids = sorted(self._where, key=id_sort_key)

    @staticmethod
    def exists(out_dir: str | Path) -> bool:
        """True once a run has finished every sample (an interrupted store is resumed, not used)."""
        return (Path(out_dir) / COMPLETE_FILE).exists() and (Path(out_dir) / META_FILE).exists()

    @property
    def complete(self) -> bool:
        return ScoreStore.exists(self.dir)

    @property
    def shape(self) -> tuple[int, int]:
        """(L, D): layers and rows per layer of every sample's score matrix."""
        return tuple(self.meta["shape"])

    @property
    def num_samples(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def iter_chunks(self, chunk_size: int = 256) -> Iterator[torch.Tensor]:
        """Float32 tensors [n, L, D], n <= chunk_size, covering every sample once in `ids()` order."""
        from safetensors import safe_open

        if chunk_size < 1:
            raise LokiError(f"chunk_size must be positive, got {chunk_size}.")
        for start in range(0, len(self._ids), chunk_size):
            chunk_ids = self._ids[start : start + chunk_size]
            by_shard: dict[Path, list[tuple[int, int]]] = {}
            for position, sample_id in enumerate(chunk_ids):
                shard, row = self._where[sample_id]
                by_shard.setdefault(shard, []).append((position, row))
            out = torch.empty(len(chunk_ids), *self.shape, dtype=torch.float32)
            for shard, wanted in by_shard.items():
                with safe_open(str(shard), framework="pt") as f:
                    rows = f.get_slice("scores")
                    for position, row in wanted:
                        out[position] = rows[row : row + 1][0].float()
            yield out

    def load(self) -> tuple[list[str], torch.Tensor]:
        """All ids and scores at once (small stores, tests)."""
        chunks = list(self.iter_chunks())
        return self.ids(), torch.cat(chunks) if chunks else torch.empty(0, *self.shape)
