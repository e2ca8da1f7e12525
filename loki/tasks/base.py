"""What every task evaluator shares: its config's common fields and the evaluator interface.

A task kind is one module in `loki/tasks/` (found by name, `loki.tasks.evaluator_for`) that defines:
- `Config`: a dataclass subclassing `TaskEvalConfig`, the typed schema of `task.eval` for that kind,
  each default held once, checked in `__post_init__` with one-sentence errors;
- `Evaluator`: a subclass of `TaskEvaluator` that scores a model on the task's test (and validation) data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from loki import checks


@dataclass
class TaskEvalConfig:
    """The fields every task evaluator has."""

    kind: Any = None  # the evaluator: the name of a module in loki/tasks/
    primary: Any = None  # the metric sweeps optimise and the frontier reads (one of the evaluator's metrics)

    def __post_init__(self) -> None:
        checks.text(checks.key("kind"), self.kind)
        checks.text(checks.key("primary"), self.primary)


class TaskEvaluator:
    """Scores a model on one task. Subclasses set `has_val` and implement `metrics` and `evaluate`."""

    has_val: ClassVar[bool] = True  # the task has a validation stage (LR choice, per-validation metric)

    def __init__(self, config: TaskEvalConfig):
        self.config = config

    def metrics(self) -> set[str]:
        """The metric names `evaluate` returns for this config (the primary must be one of them)."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, stage: str = "test", items: list | None = None) -> dict[str, float]:
        """The task metrics on `stage` ("test" or "val"). With `items` (a list), also append one dict per
        scored item (question, query, entry) so that a figure can be bootstrapped over items."""
        raise NotImplementedError

    def check_primary(self) -> None:
        names = self.metrics()
        if names and self.config.primary not in names:
            checks.fail(checks.key("primary"), "one of " + ", ".join(sorted(names)), self.config.primary)
