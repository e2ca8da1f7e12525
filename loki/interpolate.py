"""Weight interpolation between a base model and a trained run, without training (plain torch).

theta(alpha) = theta_0 + alpha (theta_run - theta_0): alpha = 0 is the base, alpha = 1 the run. A frontier
evaluates a few alphas of every run; this module keeps only what changed, and writes each alpha into a
model in place, so no model is reloaded between alphas:

    delta = weight_delta(base_state, trained_model)        # base_state: theta_0, e.g. a clone taken before training
    for alpha in (0.25, 0.5, 0.75):
        delta.apply(trained_model, alpha); evaluate(trained_model)
    delta.apply(trained_model, 1.0)                        # the run itself again, bit for bit

- Which tensors changed is read from the weights (bit comparison), so it works for every method: LoKI
  (only its rows of down_proj differ, and only those rows are kept), full fine-tuning, and the peft
  baselines once merged. For PiSSA and CorDA, theta_0 must be the original base weights, not the
  residual their adapters trained on: the merged model minus the original base is the run's change.
- `rows=` names the rows a run may have changed (LoKI's positions, see `down_proj_rows`): only those rows
  are kept, and a change anywhere else is an error (the run broke the LoKI invariant).
- alpha = 0 and alpha = 1 copy the stored base and run values: bit-identical. Other alphas use
  `torch.lerp` in float32 (float64 for float64 weights), then cast to the weight's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loki.errors import LokiError

DEFAULT_ALPHAS = (0.25, 0.5, 0.75)


@dataclass
class ChangedTensor:
    """One changed tensor: its base and run values, whole (rows None) or only at `rows` (dim 0)."""

    rows: torch.Tensor | None
    base: torch.Tensor
    run: torch.Tensor

    def delta(self) -> torch.Tensor:
        """theta_run - theta_0 on what is stored (the rows, or the whole tensor), in float32 or float64."""
        dtype = torch.float64 if self.base.dtype == torch.float64 else torch.float32
        return self.run.to(dtype) - self.base.to(dtype)


class WeightDelta:
    """The tensors (or rows) a run changed against its base, with both endpoints kept for exact ends."""

    def __init__(self, tensors: dict[str, ChangedTensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def numel(self) -> int:
        """Elements stored per endpoint (the memory cost is about twice this many weights)."""
        return sum(t.run.numel() for t in self.tensors.values())

    def changed_rows(self, name: str) -> list[int] | None:
        """Row indices kept for `name`, or None when the whole tensor is kept."""
        rows = self.tensors[name].rows
        return None if rows is None else rows.tolist()

    @torch.no_grad()
    def apply(self, model: nn.Module | Mapping[str, torch.Tensor], alpha: float) -> nn.Module | Mapping[str, torch.Tensor]:
        """Write theta_0 + alpha (theta_run - theta_0) into `model` (a module, or a state dict of tensors) in
        place, for the stored tensors only; every other weight is left as it is. Returns `model`."""
        alpha = _check_alpha(alpha)
        target = model.state_dict() if isinstance(model, nn.Module) else model  # module tensors share storage
        missing = [name for name in self.tensors if name not in target]
        if missing:
            raise LokiError(f"the model to interpolate has no weight {missing[0]!r}; it is not the architecture the delta was taken from.")
        for name, changed in self.tensors.items():
            dest = target[name]
            value = _interpolated(changed, alpha).to(device=dest.device, dtype=dest.dtype)
            if changed.rows is None:
                dest.copy_(value)
            else:
                dest.index_copy_(0, changed.rows.to(dest.device), value)
        return model


def weight_delta(
    base: nn.Module | Mapping[str, torch.Tensor],
    run: nn.Module | Mapping[str, torch.Tensor],
    rows: Mapping[str, Sequence[int]] | None = None,
) -> WeightDelta:
    """What `run` changed against `base` (modules or state dicts with the same names and shapes).

    Without `rows`: every floating tensor that differs in any bit is kept; when only some of its rows
    differ, only those rows. With `rows` (name -> row indices, e.g. `down_proj_rows(model, positions)`):
    exactly those rows of those tensors are kept, and any other difference raises a LokiError.
    Copies are taken, so the delta stays valid while `run` is overwritten by `apply`."""
    base_state = base.state_dict() if isinstance(base, nn.Module) else base
    run_state = run.state_dict() if isinstance(run, nn.Module) else run
    if set(base_state) != set(run_state):
        extra = sorted(set(base_state) ^ set(run_state))[0]
        raise LokiError(f"weight {extra!r} is in only one of the base and the run; merge the run into a plain model of the base's architecture first.")
    if rows is not None:
        unknown = [name for name in rows if name not in run_state]
        if unknown:
            raise LokiError(f"rows name weight {unknown[0]!r}, which the model does not have.")
    tensors: dict[str, ChangedTensor] = {}
    seen: set[tuple[int, int]] = set()  # tied weights (embeddings and LM head) appear under two names
    for name, run_value in run_state.items():
        base_value = base_state[name]
        if not (run_value.is_floating_point() and base_value.is_floating_point()):
            continue
        if tuple(base_value.shape) != tuple(run_value.shape):
            raise LokiError(f"weight {name!r} has shape {tuple(base_value.shape)} in the base but {tuple(run_value.shape)} in the run.")
        storage = (base_value.data_ptr(), run_value.data_ptr())
        if storage in seen:
            continue
        seen.add(storage)
        differs = _row_differs(base_value, run_value)
        if rows is not None:
            allowed = torch.as_tensor(list(rows.get(name, ())), dtype=torch.long)
            outside = differs.clone()
            outside[allowed.to(outside.device)] = False
            if bool(outside.any()):
                row = int(outside.nonzero()[0])
                raise LokiError(f"weight {name!r} changed outside the given rows (first at row {row}); the run is not a row-sparse run of these positions.")
            if len(allowed):
                tensors[name] = _kept(base_value, run_value, allowed)
            continue
        if not bool(differs.any()):
            continue
        changed = differs.nonzero().flatten()
        whole = base_value.ndim < 2 or len(changed) == len(differs)
        tensors[name] = _kept(base_value, run_value, None if whole else changed.cpu())
    return WeightDelta(tensors)


def down_proj_rows(model: nn.Module, positions: Sequence[Sequence[int]]) -> dict[str, list[int]]:
    """{state-dict name of layer l's down_proj weight: positions[l]}: the rows a LoKI run may change."""
    from loki import arch

    projs = arch.down_projs(model)
    if len(projs) != len(positions):
        raise LokiError(f"positions have {len(positions)} layers but the model has {len(projs)}; they are for another model.")
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(proj)]}.weight": sorted(int(r) for r in layer) for proj, layer in zip(projs, positions) if layer}


def interpolation_alphas(alphas: Iterable[float] = DEFAULT_ALPHAS) -> list[float]:
    """The alphas to evaluate, checked: each a number in [0, 1], in the order given, no repeats."""
    out = [_check_alpha(a) for a in alphas]
    if len(set(out)) != len(out):
        raise LokiError(f"interpolation alphas must not repeat, got {out}.")
    return out


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) <= 1.0):
        raise LokiError(f"interpolation alpha must be a number in [0, 1], got {alpha!r}.")
    return float(alpha)


def _row_differs(base: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """[rows] bool: which rows (dim 0; the single row of a scalar) differ in any element; NaN counts as a difference
    unless both sides hold the same NaN bits."""
    b, r = base.detach(), run.detach().to(base.device)
    if b.ndim == 0:
        b, r = b[None], r[None]
    same = (b == r) | (torch.isnan(b) & torch.isnan(r))
    return ~same.reshape(len(b), -1).all(dim=1)


def _kept(base: torch.Tensor, run: torch.Tensor, rows: torch.Tensor | None) -> ChangedTensor:
    base, run = base.detach(), run.detach().to(base.device)
    if rows is None:
        return ChangedTensor(None, base.clone(), run.clone())
    rows = rows.to(torch.long)
    return ChangedTensor(rows.cpu(), base[rows.to(base.device)].clone(), run[rows.to(base.device)].clone())


def _interpolated(changed: ChangedTensor, alpha: float) -> torch.Tensor:
    if alpha == 0.0:
        return changed.base  # exact ends: copies, not arithmetic
    if alpha == 1.0:
        return changed.run
    dtype = torch.float64 if changed.base.dtype == torch.float64 else torch.float32
    return torch.lerp(changed.base.to(dtype), changed.run.to(dtype), alpha)
