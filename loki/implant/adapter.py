"""Small exports: only what a run changed, applied later to the base model it was trained from.

A LoKI adapter (`save_adapter`) is one safetensors file, `adapter.safetensors`, holding per decoder layer
`layers.<l>.rows` (the trained rows of `down_proj.weight` after merging, in the model's dtype: for
LoKI+LoRA these are the rows with `A B` merged in) and `layers.<l>.positions` (their row indices, int64),
for every layer with selected rows. Its metadata names the base model and its weights digest.

The base's identity is `base_digest`: SHA-256 over every layer's `down_proj` shape and the float32 values
of the rows the adapter does not replace. LoKI leaves those rows bit-identical, so the digest of the trained
model at export equals the digest of the base at load, and no copy of the base is needed at export time.
Float32 values make it independent of the storage dtype (a bf16 checkpoint loaded as bf16 or fp32 gives
the same digest). `load_adapter` refuses a base whose digest differs.

For the peft LoRA baseline the adapter is peft's own (`PeftModel.save_pretrained`: adapter_config.json and
adapter_model.safetensors), plus `loki_adapter.json` with the base's identity (the digest over all its
`down_proj` rows, taken before the LoRA is merged). A full fine-tuning changes every weight, so it has no
adapter: `export.format=full` is its export (loki.config refuses `adapter` for it).

Plain torch + safetensors; peft is imported only for peft adapters.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loki.arch import decoder_layers, dims
from loki.errors import LokiError

EXPORT_FORMATS = ("full", "adapter", "none")
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "loki-adapter"
ADAPTER_VERSION = "1"
PEFT_IDENTITY_FILE = "loki_adapter.json"


def export_format(value: Any) -> str:
    """The `export` setting as one of EXPORT_FORMATS: {format: ...} (or a bare format name); the older
    `export: true|false` maps to full|none."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) or hasattr(value, "get"):
        return str(value.get("format"))
    return str(value)


def _weight(proj: nn.Module) -> torch.Tensor:
    base = getattr(proj, "base_layer", proj)  # a peft LoRA wrapper keeps the frozen base as base_layer
    return base.weight


def base_digest(model: nn.Module, positions: Sequence[Sequence[int]] | None = None) -> str:
    """SHA-256 (hex) of the model's `down_proj` weights except the rows in `positions` (all rows when None):
    the identity of the base an adapter applies to. Streams one layer at a time."""
    layers = decoder_layers(model)
    if positions is not None and len(positions) != len(layers):
        raise LokiError(f"the adapter has positions for {len(positions)} layers but the model has {len(layers)}; it was made for another model.")
    digest = hashlib.sha256()
    for index, layer in enumerate(layers):
        weight = _weight(layer.mlp.down_proj).detach()
        digest.update(f"{index}:{tuple(weight.shape)};".encode())
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        if positions is not None and len(positions[index]):
            keep[torch.as_tensor(list(positions[index]), dtype=torch.long, device=weight.device)] = False
        values = weight[keep].to(torch.float32).cpu().contiguous()
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def save_adapter(model: nn.Module, positions: Sequence[Sequence[int]], out_dir: str | os.PathLike, base_name: str = "") -> Path:
    """Write `<out_dir>/adapter.safetensors` from a merged LoKI model (plain HF, LoKI modules merged) and the
    positions it trained; returns the file's path."""
    from safetensors.torch import save_file

    from loki.implant.layer import LokiDownProj

    if any(isinstance(m, LokiDownProj) for m in model.modules()):
        raise LokiError("the model still holds LoKI modules; call merge(model, handle) before saving an adapter.")
    positions = [sorted(int(r) for r in rows) for rows in positions]
    layers = decoder_layers(model)
    if len(positions) != len(layers):
        raise LokiError(f"positions cover {len(positions)} layers but the model has {len(layers)}; pass the positions the run trained.")
    tensors: dict[str, torch.Tensor] = {}
    for index, (layer, rows) in enumerate(zip(layers, positions)):
        if not rows:
            continue
        weight = layer.mlp.down_proj.weight.detach()
        index_tensor = torch.tensor(rows, dtype=torch.long)
        tensors[f"layers.{index}.rows"] = weight.index_select(0, index_tensor.to(weight.device)).cpu().contiguous()
        tensors[f"layers.{index}.positions"] = index_tensor
    shape = dims(model)
    metadata = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "base_model": str(base_name),
        "base_digest": base_digest(model, positions),
        "digest_scope": "down_proj rows not in positions, float32, sha256",
        "dtype": str(layers[0].mlp.down_proj.weight.dtype).replace("torch.", ""),
        "num_layers": str(shape.num_layers),
        "hidden_size": str(shape.hidden_size),
        "intermediate_size": str(shape.intermediate_size),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_FILE), metadata=metadata)
    return out / ADAPTER_FILE


def read_adapter(path: str | os.PathLike) -> tuple[list[list[int]], dict[int, torch.Tensor], dict[str, str]]:
    """(positions per layer, {layer: rows [k, F]}, metadata) of a LoKI adapter file or the dir holding it."""
    from safetensors import safe_open

    file = Path(path)
    if file.is_dir():
        file = file / ADAPTER_FILE
    if not file.is_file():
        raise LokiError(f"adapter path '{path}' holds no {ADAPTER_FILE} (nor a peft adapter_config.json); pass the adapter/ dir of a run exported with export.format=adapter.")
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        if metadata.get("format") != ADAPTER_FORMAT:
            raise LokiError(f"'{file}' is not a LoKI adapter (its metadata format is {metadata.get('format')!r}, expected {ADAPTER_FORMAT!r}).")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    num_layers = int(metadata["num_layers"])
    positions: list[list[int]] = [[] for _ in range(num_layers)]
    rows: dict[int, torch.Tensor] = {}
    for key, tensor in tensors.items():
        _, layer, kind = key.split(".")
        if kind == "positions":
            positions[int(layer)] = [int(i) for i in tensor.tolist()]
        else:
            rows[int(layer)] = tensor
    return positions, rows, metadata


def _refuse_other_base(base_model: nn.Module, expected: str, base_name: str, positions=None) -> None:
    got = base_digest(base_model, positions)
    if got != expected:
        name = getattr(getattr(base_model, "config", None), "_name_or_path", "") or "the given model"
        raise LokiError(
            f"this adapter was made for base model '{base_name}' (down_proj digest {expected[:12]}) but {name} has "
            f"digest {got[:12]}; load it onto the same base model and weights it was trained from."
        )


def load_adapter(base_model: nn.Module, path: str | os.PathLike, merge: bool = True) -> nn.Module:
    """Apply an adapter (a LoKI adapter, or a peft adapter dir with loki_adapter.json) to `base_model`.

    LoKI: the adapter's rows are written into the base's `down_proj` weights in place (`merge=True`; the
    result equals the run's full export exactly), or installed as trainable `LokiDownProj` row blocks
    holding them (`merge=False`; `merge_adapter` merges them later). peft: `PeftModel.from_pretrained`,
    merged with `merge_and_unload` when `merge=True`. A base whose weights digest differs is refused."""
    folder = Path(path)
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        return _load_peft_adapter(base_model, folder, merge)
    positions, rows, metadata = read_adapter(path)
    _refuse_other_base(base_model, metadata["base_digest"], metadata.get("base_model", ""), positions)
    layers = decoder_layers(base_model)
    if not merge:
        from loki.implant.model import install

        install(base_model, positions, impl="rows")  # LokiDownProj rows initialised from the base; set below
    with torch.no_grad():
        for index, block in rows.items():
            proj = layers[index].mlp.down_proj
            if merge:
                weight = proj.weight
                weight.index_copy_(0, torch.as_tensor(positions[index], device=weight.device), block.to(weight.device, weight.dtype))
            else:
                proj.rows.copy_(block.to(proj.rows.device, proj.rows.dtype))
    return base_model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Merge LoKI row blocks left by `load_adapter(..., merge=False)` into plain Linear down_projs."""
    from loki.implant.layer import LokiDownProj

    for layer in decoder_layers(model):
        if isinstance(layer.mlp.down_proj, LokiDownProj):
            layer.mlp.down_proj = layer.mlp.down_proj.merged_linear()
    return model


def save_peft_adapter(peft_model: nn.Module, out_dir: str | os.PathLike, base_name: str = "") -> Path:
    """peft's own adapter of an unmerged PeftModel (`save_pretrained`) plus loki_adapter.json naming the base."""
    peft_model = getattr(peft_model, "_orig_mod", peft_model)  # torch.compile's wrapper
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    identity = {
        "format": ADAPTER_FORMAT + "-peft",
        "version": ADAPTER_VERSION,
        "base_model": str(base_name),
        "base_digest": base_digest(peft_model),  # before merging: the base's own down_proj weights
        "digest_scope": "all down_proj rows, float32, sha256",
    }
    (out / PEFT_IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    return out


def _load_peft_adapter(base_model: nn.Module, folder: Path, merge: bool) -> nn.Module:
    from peft import PeftModel

    identity_file = folder / PEFT_IDENTITY_FILE
    if identity_file.is_file():
        identity = json.loads(identity_file.read_text())
        _refuse_other_base(base_model, identity["base_digest"], identity.get("base_model", ""))
    model = PeftModel.from_pretrained(base_model, str(folder))
    return model.merge_and_unload() if merge else model


def adapter_bytes(num_layers: int, hidden_size: int, intermediate_size: int, q: float, bytes_per_value: int) -> int:
    """Tensor bytes of a LoKI adapter at fraction q (layer-balanced: k = floor(q * D) rows per layer):
    the rows in the model's dtype plus their int64 positions (safetensors' header not counted)."""
    k = int(q * hidden_size)
    return num_layers * k * (intermediate_size * bytes_per_value + 8)
