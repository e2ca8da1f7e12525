"""Choosing an arm's learning rate from the first seed's runs on a grid, by a validation metric.

Both studies pick this way; they differ only in the metric: the toy study by validation loss (lower is
better), the real-model study by the facts task's validation accuracy (higher is better).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from loki.errors import LokiError
from studies import metrics


@dataclass(frozen=True)
class Selection:
    """A validation metric that chooses the LR: how to read it from a run, and which direction is better."""

    name: str
    read: Callable[[Mapping], float]
    higher_is_better: bool


SELECTIONS = {
    "val_loss": Selection("val_loss", metrics.val_loss, higher_is_better=False),
    "task_val": Selection("task_val", lambda run: metrics.task_metric(run, stage="val"), higher_is_better=True),
}


def choose_lr(runs_by_lr: Mapping[float, Mapping], selection: Selection | str) -> float:
    """The LR whose run scored best on `selection`; on a tie the smaller LR (the smaller step is the safer one).

    A run without the metric is refused by name: choosing among the others would hide a broken run."""
    selection = SELECTIONS[selection] if isinstance(selection, str) else selection
    scored = {float(lr): selection.read(run) for lr, run in runs_by_lr.items()}
    missing = [lr for lr, value in scored.items() if value is None or math.isnan(value)]
    if missing:
        raise LokiError(f"the run at lr={missing[0]:g} has no {selection.name} in its metrics.json (a run from before it was recorded?); delete it and rerun.")
    if not scored:
        raise LokiError(f"choosing an LR by {selection.name} needs at least one finished run, got none.")
    sign = -1.0 if selection.higher_is_better else 1.0
    return min(scored, key=lambda lr: (sign * scored[lr], lr))
