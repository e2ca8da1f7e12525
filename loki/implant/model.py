"""Install, merge and export: put the implant into a Hugging Face model and take it out again.

- ``impl="hook"``: the whole `down_proj.weight` is a trainable parameter and a gradient hook zeroes the
  unselected rows; `attach_optimizer` stops weight decay from moving them (see guard.py).
- ``impl="rows"``: each `down_proj` becomes a `LokiDownProj` with a trainable `[k, F]` block, so gradients
  and optimizer state scale with `q`.
- ``lora_rank=r > 0`` (whatever `impl` says): `LokiDownProj` with LoRA confined to the selected rows.

Plain torch: no Lightning; `loki.lightning.LokiCallback` calls these at the right moments of `fit`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from loki.arch import Dims, decoder_layers, dims
from loki.errors import LokiError
from loki.implant.guard import RowGuard, RowStepScale, mask_gradient
from loki.implant.layer import LokiDownProj, row_mask
from loki.positions import Positions, load_positions, validate_positions

IMPLS = ("hook", "rows")


@dataclass
class LokiHandle:
    """What `install` changed in a model, so that `merge` can undo it and `summary` can describe it."""

    model: nn.Module
    mode: str  # "hook", "rows" or "lora"
    positions: Positions
    dims: Dims
    lora_rank: int
    lora_alpha: float | None
    total_params: int
    grad_hooks: list[RemovableHandle] = field(default_factory=list)
    masked_weights: list[torch.Tensor] = field(default_factory=list)
    row_indices: list[torch.Tensor] = field(default_factory=list)  # sorted selected rows, per layer with k>0
    guards: list[RowGuard] = field(default_factory=list)
    step_scales: list[RowStepScale] = field(default_factory=list)
    merged: bool = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters LoKI made trainable (what the optimizer must hold)."""
        if self.mode == "hook":
            return list(self.masked_weights)
        return [p for m in self.model.modules() if isinstance(m, LokiDownProj) for p in m.parameters() if p.requires_grad]

    def summary(self) -> dict[str, Any]:
        d, f = self.dims.hidden_size, self.dims.intermediate_size
        ks = [len(layer) for layer in self.positions]
        trained_layers = [k for k in ks if k > 0]
        rows_effective = sum(k * f for k in trained_layers)
        if self.mode == "hook":
            allocated, effective = len(trained_layers) * d * f, rows_effective
            notes = (
                "hook: every trained layer's full down_proj.weight is a parameter (gradients and optimizer state "
                "are full size); a gradient hook zeroes the unselected rows and an optimizer guard keeps weight "
                "decay off them."
            )
        elif self.mode == "rows":
            allocated = effective = rows_effective
            notes = "rows: only the selected [k, F] rows are parameters; gradients and optimizer state scale with q."
        else:
            r = self.lora_rank
            allocated = effective = sum(k * r + r * f for k in trained_layers)
            notes = (
                f"lora: dW_S = (alpha/r) A B per layer with A [k, {r}], B [{r}, {f}], alpha={self.lora_alpha or r}; "
                "allocated compactly, so allocated equals effective."
            )
        return {
            "mode": self.mode,
            "total_params": self.total_params,
            "trainable_allocated": allocated,
            "trainable_effective": effective,
            "effective_fraction": effective / self.total_params,
            "rows_per_layer": ks,
            "lora_rank": self.lora_rank,
            "notes": notes,
        }


def check_options(impl: str, lora_rank: int, lora_alpha: float | None, lora_dropout: float) -> None:
    if impl not in IMPLS:
        raise LokiError(f"loki.impl must be one of {', '.join(IMPLS)}, got {impl!r}.")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise LokiError(f"lora.rank must be a non-negative integer (0 turns LoRA off), got {lora_rank!r}.")
    if lora_alpha is not None and not (isinstance(lora_alpha, (int, float)) and lora_alpha > 0):
        raise LokiError(f"lora.alpha must be a positive number (or null for alpha = rank), got {lora_alpha!r}.")
    if not (isinstance(lora_dropout, (int, float)) and 0.0 <= lora_dropout < 1.0):
        raise LokiError(f"lora.dropout must be in [0, 1), got {lora_dropout!r}.")


LOW_PRECISION = (torch.bfloat16, torch.float16)
_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def check_precision(impl: str, lora_rank: int, weight_dtype: torch.dtype | str | None) -> None:
    """LokiError if `impl="hook"` (without LoRA) would train bf16/fp16 weights in place.

    The hook trains the model's own `down_proj.weight`, so with low-precision weights the parameter and
    its optimizer state are bf16/fp16 and updates smaller than half an ulp round away (at lr 1e-5 a bf16
    run kept ~30-65 % of the fp32 update). `impl=rows` and LoRA keep float32 masters instead.
    `weight_dtype` may be a torch dtype or a config name ("bfloat16", "float16", ...); None passes.
    """
    if impl != "hook" or lora_rank > 0 or weight_dtype is None:
        return
    dtype = _DTYPE_NAMES.get(weight_dtype, weight_dtype) if isinstance(weight_dtype, str) else weight_dtype
    if dtype in LOW_PRECISION:
        name = str(dtype).removeprefix("torch.")
        raise LokiError(
            f"loki.impl=hook would train the {name} down_proj weights in place, where small updates round away; "
            "use loki.impl=rows, which trains float32 master rows, or load the model in float32."
        )


def check_positions(model: nn.Module, positions, lora_rank: int = 0) -> tuple[Positions, Dims]:
    """Positions (list or JSON path) checked against `model` and the LoRA rank; LokiError otherwise."""
    model_dims = dims(model)  # LokiError naming the supported families if there is no down_proj
    where = str(positions) if isinstance(positions, (str, os.PathLike)) else "positions"
    checked = validate_positions(load_positions(positions), model_dims.num_layers, model_dims.hidden_size, where)
    if lora_rank > 0:
        k_min = min(len(layer) for layer in checked if layer)
        if lora_rank > k_min:
            raise LokiError(
                f"lora.rank={lora_rank} is larger than the {k_min} selected rows of a layer; a rank above k adds "
                f"parameters without adding expressiveness, so use lora.rank <= {k_min} or a larger loki.q."
            )
    return checked, model_dims


def install(
    model: nn.Module,
    positions,
    impl: str = "hook",
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
) -> LokiHandle:
    """Freeze `model` and make only the selected rows of each `down_proj.weight` trainable.

    `positions`: list of per-layer row lists, or a path to a JSON file in the published format. All
    checks run before the model is touched. With `impl="hook"`, call `attach_optimizer(handle, opt)`
    on every optimizer that holds the masked weights, or weight decay will move the unselected rows.
    With bf16/fp16 weights, rows and LoRA train float32 masters and `impl="hook"` is refused
    (`check_precision`).
    """
    check_options(impl, lora_rank, lora_alpha, lora_dropout)
    if any(isinstance(m, LokiDownProj) for m in model.modules()):
        raise LokiError("the model already has LoKI modules installed; merge(model, handle) before installing again.")
    positions, model_dims = check_positions(model, positions, lora_rank)
    for layer, rows in zip(decoder_layers(model), positions):
        if rows:
            check_precision(impl, lora_rank, layer.mlp.down_proj.weight.dtype)
    mode = "lora" if lora_rank > 0 else impl
    handle = LokiHandle(
        model=model,
        mode=mode,
        positions=positions,
        dims=model_dims,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        total_params=sum(p.numel() for p in model.parameters()),
    )
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, rows in zip(decoder_layers(model), positions):
        if not rows:
            continue  # a layer without selected rows stays entirely frozen
        index = torch.tensor(sorted(rows), dtype=torch.long)
        handle.row_indices.append(index)
        if mode == "hook":
            weight = layer.mlp.down_proj.weight
            weight.requires_grad_(True)
            drop = ~row_mask(rows, model_dims.hidden_size)
            handle.grad_hooks.append(weight.register_hook(mask_gradient(drop)))
            handle.masked_weights.append(weight)
        else:
            layer.mlp.down_proj = LokiDownProj(layer.mlp.down_proj, index, lora_rank, lora_alpha, lora_dropout)
    return handle


def attach_optimizer(handle: LokiHandle, optimizer: torch.optim.Optimizer) -> None:
    """Make `optimizer` keep the unselected rows still (impl="hook"); a no-op for rows and LoRA."""
    if handle.mode != "hook" or any(g.optimizer is optimizer for g in handle.guards):
        return
    selected, unselected = {}, {}
    for weight, index in zip(handle.masked_weights, handle.row_indices):
        selected[id(weight)] = index
        unselected[id(weight)] = (~row_mask(index.tolist(), weight.shape[0])).nonzero().flatten()
    handle.guards.append(RowGuard(optimizer, selected, unselected))


def soft_scales(positions: Positions) -> list[list[float]]:
    """Soft selection's per-row factors: in each layer's list (rank order, most clearly unimportant first),
    row i of k' gets 1 - i/k', from 1 down to 1/k' (their sum is (k'+1)/2: about k rows' worth at k' = 2k)."""
    return [[1.0 - i / len(rows) for i in range(len(rows))] for rows in positions]


def attach_row_scales(handle: LokiHandle, optimizer: torch.optim.Optimizer, scales: Sequence[Sequence[float]]) -> None:
    """Scale each selected row's updates by `scales` (aligned with `handle.positions`, layer by layer) in
    every step of `optimizer` (RowStepScale). impl=hook and rows; LoRA on the rows has no per-row update."""
    if handle.mode == "lora":
        raise LokiError("per-row learning rates (loki.soft) apply to the rows themselves, not to LoRA on them; use lora.rank=0.")
    if any(s.optimizer is optimizer for s in handle.step_scales):
        return
    if len(scales) != len(handle.positions) or any(len(a) != len(b) for a, b in zip(scales, handle.positions)):
        raise LokiError("the per-row scales must have one factor per selected row of every layer.")
    entries = []
    tensors = handle.masked_weights if handle.mode == "hook" else [m.rows for m in handle.model.modules() if isinstance(m, LokiDownProj)]
    layers = [(rows, factors) for rows, factors in zip(handle.positions, scales) if rows]
    for tensor, index, (rows, factors) in zip(tensors, handle.row_indices, layers):
        by_row = dict(zip(rows, factors))
        ordered = torch.tensor([by_row[r] for r in index.tolist()], dtype=torch.float32)  # aligned with the sorted index
        entries.append((tensor, index if handle.mode == "hook" else None, ordered))
    handle.step_scales.append(RowStepScale(optimizer, entries))


def check_optimizer_holds(handle: LokiHandle, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """LokiError if the optimizers do not hold every parameter LoKI made trainable."""
    held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    trainable = handle.trainable_parameters()
    missing = sum(id(p) not in held for p in trainable)
    if missing:
        raise LokiError(
            f"the optimizer holds only {len(trainable) - missing} of the {len(trainable)} parameters LoKI made "
            "trainable; build it in configure_optimizers from the parameters with requires_grad=True."
        )


def merge(model: nn.Module, handle: LokiHandle) -> nn.Module:
    """Undo `install`: trained rows (or merged LoRA) written into ordinary nn.Linear down_projs, every hook
    removed. All parameters are left frozen (requires_grad=False). Idempotent; returns `model`."""
    if handle.merged:
        return model
    for guard in [*handle.guards, *handle.step_scales]:
        guard.remove()
    for hook in handle.grad_hooks:
        hook.remove()
    for weight in handle.masked_weights:
        weight.requires_grad_(False)
    for layer in decoder_layers(model):
        if isinstance(layer.mlp.down_proj, LokiDownProj):
            layer.mlp.down_proj = layer.mlp.down_proj.merged_linear()
    handle.guards, handle.grad_hooks, handle.step_scales = [], [], []
    handle.merged = True
    return model


def export_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, is_main_process: bool = True) -> Path:
    """save_pretrained (safetensors) of a merged plain HF model plus its tokenizer; loads without this package."""
    if any(isinstance(m, LokiDownProj) for m in model.modules()):
        raise LokiError("the model still holds LoKI modules; call merge(model, handle) before exporting it.")
    out = Path(out_dir)
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return out




def positions_digest(positions: Positions) -> str:
    """A short hash of positions: checkpoints record it so a resume with other rows fails clearly."""
    return hashlib.sha1(json.dumps(positions).encode()).hexdigest()
