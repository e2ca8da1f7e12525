"""Exact freezing under optimizers for `impl="hook"`: the gradient row mask and the weight-decay guard."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

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


class RowGuard:
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


def mask_gradient(drop_rows: torch.Tensor):
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


class RowStepScale:
    """Per-row learning rates for selected rows (soft selection): after each optimizer step, every selected
    row is set to `before + s * (after - before)`, so its whole update (gradient step, momentum, weight
    decay) is scaled by its own factor s. For SGD and Adam(W) that is exactly a per-row learning rate.

    entries: (parameter, rows, scales) with rows the indices of the selected rows in the parameter's first
    dimension (None: every row, as for LokiDownProj's [k, F] block) and scales one factor per row."""

    def __init__(self, optimizer: torch.optim.Optimizer, entries: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]):
        self.optimizer = optimizer
        self.entries = [(p, None if rows is None else rows.to(p.device), scales.to(device=p.device, dtype=p.dtype)[:, None]) for p, rows, scales in entries]
        self.before: list[torch.Tensor] = []
        self.handles: list[RemovableHandle] = [optimizer.register_step_pre_hook(self._pre_step), optimizer.register_step_post_hook(self._post_step)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _pre_step(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            self.before = [(p.detach().clone() if rows is None else p.detach().index_select(0, rows)) for p, rows, _ in self.entries]

    def _post_step(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            for (p, rows, scales), before in zip(self.entries, self.before):
                after = p if rows is None else p.index_select(0, rows)
                scaled = before + scales * (after - before)
                if rows is None:
                    p.copy_(scaled)
                else:
                    p.index_copy_(0, rows, scaled)
        self.before = []
