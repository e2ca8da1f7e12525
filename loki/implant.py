"""Implanting: train only the selected rows of every layer's `down_proj.weight`, keep the rest bit-identical.

Row `j` of layer `l` is row `j` of `down_proj.weight` (shape [D, F]); `positions[l]` lists the rows of layer
`l` that learn. Three modes, one contract (every other parameter and every unselected row is bit-identical
after training, and the result merges back into a plain Hugging Face model):

- ``impl="hook"``: the whole `down_proj.weight` is a trainable parameter and a gradient hook zeroes the
  unselected rows. Gradients and optimizer state are full size; an optimizer guard (`attach_optimizer`)
  stops weight decay from moving the zero-gradient rows.
- ``impl="rows"``: each `down_proj` becomes a `LokiDownProj` holding the frozen base weight plus a trainable
  `[k, F]` parameter of the selected rows, so gradients and optimizer state scale with `q`.
- ``lora_rank=r > 0`` (whatever `impl` says): `LokiDownProj` with a LoRA update confined to the selected
  rows, `dW_S = scaling * A @ B` with `A: [k, r]` (zero-initialised) and `B: [r, F]`.

Plain functions (`install`, `attach_optimizer`, `merge`, `export_model`) work without Lightning;
`LokiCallback` only calls them at the right moments of `Trainer.fit`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.hooks import RemovableHandle

from loki.arch import Dims, decoder_layers, dims
from loki.errors import LokiError
from loki.positions import Positions, load_positions, validate_positions

IMPLS = ("hook", "rows")


def row_mask(rows: Sequence[int], hidden_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean [hidden_size] mask, True at the selected rows."""
    mask = torch.zeros(hidden_size, dtype=torch.bool, device=device)
    if len(rows):
        mask[torch.as_tensor(list(rows), dtype=torch.long, device=device)] = True
    return mask


class LokiDownProj(nn.Module):
    """A `down_proj` whose selected output rows are trainable: as a `[k, F]` block, or as LoRA on that block.

    `weight` and `bias` are the original (frozen) parameters, shared, not copied. The base linear map is
    computed in full and the selected output coordinates are then replaced (rows) or corrected (LoRA),
    so the backward pass computes a weight gradient of size `[k, F]` (or the LoRA factors) only.
    """

    def __init__(
        self,
        linear: nn.Linear,
        row_index: torch.Tensor,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Not persistent: the positions come from the callback's configuration, not from checkpoints.
        self.register_buffer("row_index", row_index.to(device=self.weight.device, dtype=torch.long), persistent=False)
        self.lora_rank = int(lora_rank)
        k, fan_in = len(row_index), self.in_features
        if self.lora_rank == 0:
            self.rows = nn.Parameter(self.weight.detach().index_select(0, self.row_index).clone())
        else:
            self.lora_scaling = float(lora_alpha if lora_alpha is not None else lora_rank) / self.lora_rank
            # A zero-initialised, so training starts exactly at the base model (the usual LoRA choice).
            self.lora_A = nn.Parameter(torch.zeros(k, self.lora_rank, dtype=self.weight.dtype, device=self.weight.device))
            self.lora_B = nn.Parameter(torch.empty(self.lora_rank, fan_in, dtype=self.weight.dtype, device=self.weight.device))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))  # same init as an nn.Linear(F, r)
            self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_rank == 0:
            bias = None if self.bias is None else self.bias.index_select(0, self.row_index)
            selected = F.linear(x, self.rows, bias)
            return out.index_copy(-1, self.row_index, selected.to(out.dtype))
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_B), self.lora_A) * self.lora_scaling
        return out.index_add(-1, self.row_index, delta.to(out.dtype))

    @torch.no_grad()
    def trained_rows(self) -> torch.Tensor:
        """The current values of the selected rows of the effective weight, `[k, F]`, in the weight's dtype."""
        if self.lora_rank == 0:
            return self.rows.detach().to(self.weight.dtype)
        base = self.weight.index_select(0, self.row_index)
        # Merge in float32 so a bf16 model does not round the product before the sum.
        delta = self.lora_scaling * (self.lora_A.float() @ self.lora_B.float())
        return (base.float() + delta).to(self.weight.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with the trained rows written into the (shared) base weight."""
        self.weight.index_copy_(0, self.row_index, self.trained_rows())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        mode = "rows" if self.lora_rank == 0 else f"lora r={self.lora_rank}"
        return f"in={self.in_features}, out={self.out_features}, k={len(self.row_index)}, {mode}"


# --------------------------------------------------------------------------------------------------------
# Exact freezing under optimizers (impl="hook")
#
# A zero gradient is not enough to keep a row still:
# - decoupled weight decay (AdamW, Adam(decoupled_weight_decay=True)) does p *= 1 - lr*wd on every
#   parameter that has a gradient, zero or not;
# - coupled L2 decay (Adam(weight_decay), SGD(weight_decay)) adds wd*p to the gradient, so the row gets a
#   non-zero gradient after our mask ran.
# For the optimizers whose update maps a zero gradient with zero state to exactly zero (Adam/AdamW with
# eps > 0, SGD), the guard takes the decay over for one step: it sets the group's weight_decay to 0 and
# applies the same decay itself, to the selected rows of masked weights and to every other parameter of
# the group that has a gradient, exactly where the optimizer would (after the closure ran, before the
# update). No extra memory. Everything else (other optimizers, maximize=True, eps=0) gets the generic
# fallback: snapshot the unselected rows before the step and write them back after (costs one copy of
# the unselected rows, about the size of all down_proj weights).
# --------------------------------------------------------------------------------------------------------

_FOLDABLE_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


class _RowGuard:
    """Optimizer step hooks that keep the unselected rows of masked weights bit-identical."""

    def __init__(self, optimizer: torch.optim.Optimizer, selected: dict[int, torch.Tensor], unselected: dict[int, torch.Tensor]):
        self.optimizer = optimizer
        self.selected, self.unselected = selected, unselected  # id(weight) -> row indices (cpu)
        self.saved_weight_decay: list[tuple[dict, Any]] = []
        self.snapshots: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    def remove(self) -> None:
        self._restore_weight_decay()
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _masked_groups(self) -> list[dict]:
        return [g for g in self.optimizer.param_groups if any(id(p) in self.selected for p in g["params"])]

    def _can_fold(self, groups: list[dict]) -> bool:
        if type(self.optimizer) not in _FOLDABLE_OPTIMIZERS:
            return False
        for group in groups:
            if group.get("maximize", False) or group.get("differentiable", False):
                return False
            if not isinstance(self.optimizer, torch.optim.SGD) and not group["eps"] > 0:
                return False  # 0 / (sqrt(0) + 0) is NaN on a zero-gradient row
        return True

    def _pre_step(self, optimizer, args, kwargs):
        self._restore_weight_decay()  # in case the previous step raised before the post-hook
        groups = self._masked_groups()
        if not groups:
            return None
        if not self._can_fold(groups):
            with torch.no_grad():
                self.snapshots = [
                    (p, idx, p.detach().index_select(0, idx))
                    for g in groups
                    for p in g["params"]
                    if id(p) in self.unselected
                    for idx in [self.unselected[id(p)].to(p.device)]
                ]
            return None
        if not any(_weight_decay_value(g) != 0 for g in groups):
            return None  # a zero gradient with zero state gives a zero update: nothing to do
        # `args` starts with the optimizer itself (torch passes step's full positional arguments).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:  # plain loop: backward already ran, gradients exist now
            self._take_over_weight_decay(groups)
            return None

        # Lightning (and any closure user) runs forward/backward inside step(); which parameters get a
        # gradient is only known after the closure, so the decay is applied right after it.
        def closure_then_decay():
            loss = closure()
            self._take_over_weight_decay(groups)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_decay}
        return (args[0], closure_then_decay, *args[2:]), kwargs

    @torch.no_grad()
    def _take_over_weight_decay(self, groups: list[dict]) -> None:
        for group in groups:
            wd = _weight_decay_value(group)
            if wd == 0:
                continue
            decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(self.optimizer, torch.optim.AdamW)
            for p in group["params"]:
                if p.grad is None:
                    continue  # the optimizer skips it, so do we
                idx = self.selected.get(id(p))
                if idx is not None:
                    idx = idx.to(p.device)
                if decoupled:
                    factor = 1 - group["lr"] * wd  # the very expression AdamW uses
                    if idx is None:
                        p.mul_(factor)
                    else:
                        p.index_copy_(0, idx, p.index_select(0, idx).mul_(factor))
                else:
                    if idx is None:
                        p.grad.add_(p, alpha=wd)
                    else:
                        p.grad.index_add_(0, idx, p.index_select(0, idx), alpha=wd)
            self.saved_weight_decay.append((group, group["weight_decay"]))
            group["weight_decay"] = 0.0

    def _restore_weight_decay(self) -> None:
        for group, wd in self.saved_weight_decay:
            group["weight_decay"] = wd
        self.saved_weight_decay = []

    def _post_step(self, optimizer, args, kwargs) -> None:
        self._restore_weight_decay()
        if self.snapshots:
            with torch.no_grad():
                for p, idx, saved in self.snapshots:
                    p.index_copy_(0, idx, saved)
            self.snapshots = []


def _weight_decay_value(group: dict) -> float:
    wd = group.get("weight_decay", 0.0)
    return float(wd) if torch.is_tensor(wd) else wd


def _mask_gradient(drop_rows: torch.Tensor):
    """Gradient hook zeroing the unselected rows; runs before the gradient is accumulated into `.grad`,
    hence before DDP's reducer (an AccumulateGrad post-hook) all-reduces it."""
    drop_by_device: dict[torch.device, torch.Tensor] = {}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        drop = drop_by_device.get(grad.device)
        if drop is None:  # the model may have moved to another device after install
            drop = drop_by_device[grad.device] = drop_rows.to(grad.device)[:, None]
        # masked_fill, not a multiply: inf * 0 would be NaN (fp16 overflow before the loss scaler skips).
        return grad.masked_fill(drop, 0)

    return hook


# --------------------------------------------------------------------------------------------------------
# install / merge / export
# --------------------------------------------------------------------------------------------------------


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
    guards: list[_RowGuard] = field(default_factory=list)
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


def _check_options(impl: str, lora_rank: int, lora_alpha: float | None, lora_dropout: float) -> None:
    if impl not in IMPLS:
        raise LokiError(f"loki.impl must be one of {', '.join(IMPLS)}, got {impl!r}.")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise LokiError(f"lora.rank must be a non-negative integer (0 turns LoRA off), got {lora_rank!r}.")
    if lora_alpha is not None and not (isinstance(lora_alpha, (int, float)) and lora_alpha > 0):
        raise LokiError(f"lora.alpha must be a positive number (or null for alpha = rank), got {lora_alpha!r}.")
    if not (isinstance(lora_dropout, (int, float)) and 0.0 <= lora_dropout < 1.0):
        raise LokiError(f"lora.dropout must be in [0, 1), got {lora_dropout!r}.")


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


_checked_positions = check_positions  # the name loki/recipe.py imports today


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
    """
    _check_options(impl, lora_rank, lora_alpha, lora_dropout)
    if any(isinstance(m, LokiDownProj) for m in model.modules()):
        raise LokiError("the model already has LoKI modules installed; merge(model, handle) before installing again.")
    positions, model_dims = check_positions(model, positions, lora_rank)
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
            handle.grad_hooks.append(weight.register_hook(_mask_gradient(drop)))
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
    handle.guards.append(_RowGuard(optimizer, selected, unselected))


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
    for guard in handle.guards:
        guard.remove()
    for hook in handle.grad_hooks:
        hook.remove()
    for weight in handle.masked_weights:
        weight.requires_grad_(False)
    for layer in decoder_layers(model):
        if isinstance(layer.mlp.down_proj, LokiDownProj):
            layer.mlp.down_proj = layer.mlp.down_proj.merged_linear()
    handle.guards, handle.grad_hooks = [], []
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


# --------------------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------------------


class LokiCallback(pl.Callback):
    """Implant LoKI into `pl_module.model` for `Trainer.fit` and hand back a plain HF model at the end.

    Lightning's order in fit: `setup` (here: freeze + install, before `configure_optimizers`) ->
    checkpoint model weights restored on resume (the LoKI parameters already exist, so they load) ->
    strategy setup (DDP wrap, optimizers) -> `on_fit_start` (here: check the optimizers and attach the
    weight-decay guard) -> optimizer state restored -> training -> `on_fit_end` (here: merge).

    After fit (or an exception), `pl_module.model` is an ordinary HF model with the trained rows merged,
    no LoKI modules, no hooks, and every parameter frozen (requires_grad=False). Lightning checkpoints
    written during fit hold the LoKI layout (e.g. `down_proj.rows`) and resume with the same callback
    settings; use `export_model` (or the merged model) for a portable result.
    """

    def __init__(
        self,
        positions,
        impl: str = "hook",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
    ):
        _check_options(impl, lora_rank, lora_alpha, lora_dropout)
        if OmegaConf.is_config(positions):  # hydra.utils.instantiate passes a ListConfig by default
            positions = OmegaConf.to_container(positions, resolve=True)
        self.positions = load_positions(positions)  # unreadable / non-JSON files fail at construction
        self.positions_source = str(positions) if isinstance(positions, (str, os.PathLike)) else "positions"
        self.impl, self.lora_rank, self.lora_alpha, self.lora_dropout = impl, lora_rank, lora_alpha, lora_dropout
        self.handle: LokiHandle | None = None

    @staticmethod
    def _hf_model(pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            raise LokiError("LokiCallback needs the Hugging Face model at `pl_module.model`, but there is none.")
        return model

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = self._hf_model(pl_module)
        if self.handle is not None and not self.handle.merged and self.handle.model is model:
            return  # already installed on this model (setup called twice)
        # Checked here first so that an error names the positions file, not just "positions".
        model_dims = dims(model)
        validate_positions(self.positions, model_dims.num_layers, model_dims.hidden_size, self.positions_source)
        self.handle = install(model, self.positions, self.impl, self.lora_rank, self.lora_alpha, self.lora_dropout)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.handle is None:
            return
        check_optimizer_holds(self.handle, trainer.optimizers)
        for optimizer in trainer.optimizers:
            attach_optimizer(self.handle, optimizer)

    def _merge(self, pl_module: pl.LightningModule) -> None:
        if self.handle is not None and not self.handle.merged:
            merge(self.handle.model, self.handle)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._merge(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._merge(pl_module)

    def summary(self) -> dict[str, Any]:
        """Parameter counts of the installed implant (available from `setup` on, also after fit)."""
        if self.handle is None:
            raise LokiError("LokiCallback.summary() is available once Trainer.fit has called setup.")
        return self.handle.summary()

    # Checkpoints remember what they were trained with, so a resume with other positions fails clearly.
    def state_dict(self) -> dict[str, Any]:
        return {"mode": "lora" if self.lora_rank else self.impl, "lora_rank": self.lora_rank, "positions_sha1": _digest(self.positions)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key, value in mine.items():
            if key in state_dict and state_dict[key] != value:
                raise LokiError(
                    f"the checkpoint was trained with LoKI {key}={state_dict[key]!r} but this run has {value!r}; "
                    "resume with the same positions, loki.impl and lora.rank."
                )


def _digest(positions: Positions) -> str:
    return hashlib.sha1(json.dumps(positions).encode()).hexdigest()
