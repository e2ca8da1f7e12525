"""An L2 pull of the trained rows towards their base values (L2-SP, Li et al. 2018), optionally weighted by
each row's attribution mass (issue 20, variant 5: the rows KVA scores higher are held closer to the base).

    penalty = weight / 2 * sum over layers l, selected rows r of  w_r * ||W_l[r] - W0_l[r]||^2

`W0` are the selected rows at install (so a resumed run, which installs on the base model and then loads
its trained state, pulls towards the base too). `w_r` are given per row in the positions' order;
`kva_row_weights` makes them from the attribution scores, scaled to mean 1 over every selected row, so that
`weight` means the same as in plain L2-SP (all `w_r = 1`). The penalty is a loss term: its gradient is
`weight * w_r * (W[r] - W0[r])` on row r and zero elsewhere, so the unselected rows stay bit-identical.

Plain torch: `loki.lightning.LokiCallback` adds it to the training loss (`CausalLMModule.penalties`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loki.errors import LokiError
from loki.implant.layer import LokiDownProj
from loki.positions import Positions

L2SP_ROWS = ("kva", "uniform")  # loki.l2sp_rows: what weights each row's pull


def kva_row_weights(mass: torch.Tensor, positions: Positions) -> list[list[float]]:
    """Per selected row (positions' order) its mean |score| `mass[l, r]` (`loki.select.row_mass`), divided by
    the mean over every selected row of every layer, so the weights average 1."""
    mass = torch.as_tensor(mass, dtype=torch.float64)
    if mass.dim() != 2 or mass.shape[0] != len(positions):
        raise LokiError(f"the row mass has shape {tuple(mass.shape)} but the positions have {len(positions)} layers.")
    chosen = [mass[l, torch.as_tensor(rows, dtype=torch.long)] for l, rows in enumerate(positions) if rows]
    if not chosen:
        raise LokiError("no row is selected, so there is no row to pull towards the base.")
    mean = torch.cat(chosen).mean()
    if not torch.isfinite(mean) or mean <= 0:
        raise LokiError(f"the selected rows' mean |score| is {float(mean):g}; the |KVA| weights need a positive one (use loki.l2sp_rows=uniform).")
    return [(mass[l, torch.as_tensor(rows, dtype=torch.long)] / mean).tolist() if rows else [] for l, rows in enumerate(positions)]


class RowPull:
    """`pull()` is the L2-SP penalty of the rows `handle` (loki.implant.install) trains, differentiable in
    the trainable tensors: the masked weights (impl=hook), the `[k, F]` blocks (rows) or the LoRA factors."""

    def __init__(self, handle, weight: float, row_weights: Sequence[Sequence[float]] | None = None):
        if not weight >= 0:
            raise LokiError(f"the L2 pull's weight must be 0 or more, got {weight!r}.")
        positions = handle.positions
        if row_weights is None:
            row_weights = [[1.0] * len(rows) for rows in positions]
        if len(row_weights) != len(positions) or any(len(a) != len(b) for a, b in zip(row_weights, positions)):
            raise LokiError("the L2 pull needs one weight per selected row of every layer.")
        self.handle, self.weight = handle, float(weight)
        self.modules = [m for m in handle.model.modules() if isinstance(m, LokiDownProj)]
        self.base: list[torch.Tensor] = []  # per layer with rows: W0[r] for r in the sorted index, float32
        self.row_weights: list[torch.Tensor] = []  # aligned with the sorted index, [k, 1]
        layers = [(rows, w) for rows, w in zip(positions, row_weights) if rows]
        for i, (index, (rows, w)) in enumerate(zip(handle.row_indices, layers)):
            by_row = dict(zip(rows, w))
            self.row_weights.append(torch.tensor([by_row[r] for r in index.tolist()], dtype=torch.float32)[:, None])
            if handle.mode == "lora":  # the rows are base + delta and the delta starts at zero: no copy needed
                self.base.append(torch.empty(0))
            else:
                self.base.append(self._current(i).detach().float().clone())

    def _current(self, i: int) -> torch.Tensor:
        if self.handle.mode == "hook":
            return self.handle.masked_weights[i].index_select(0, self.handle.row_indices[i])
        return self.modules[i].rows

    def _delta(self, i: int) -> torch.Tensor:
        if self.handle.mode == "lora":
            m = self.modules[i]
            return m.lora_scaling * (m.lora_A @ m.lora_B)
        current = self._current(i)
        return current.float() - self.base[i].to(current.device)

    def __call__(self) -> torch.Tensor:
        total = None
        for i, w in enumerate(self.row_weights):
            delta = self._delta(i)
            term = (w.to(delta.device) * delta.pow(2)).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.weight * total

