"""Tasks: what a run teaches the model, and how the result is scored.

A task (`cfg.task`) is one object, `Task`: its training data (`task.data`, a Lightning DataModule built
with `hydra.utils.instantiate`), its evaluator (`task.eval`, found by `task.eval.kind` in this package)
and the name of its primary metric (`task.eval.primary`). Task metrics are never part of the forgetting
report: retention benchmarks (`cfg.eval`) measure what the model already knew, and only those.

Adding a task kind: one module `loki/tasks/<kind>.py` defining `Config` (a `TaskEvalConfig` dataclass:
the schema of `task.eval`, defaults held once) and `Evaluator` (a `TaskEvaluator`), plus a config
`conf/task/<name>.yaml` with `eval.kind: <kind>`. Kinds are found by module name; nothing is listed
by hand. Kinds in this package: `reranker`, `bfcl`, `cloze_qa`, `facts`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loki import checks
from loki.errors import LokiError
from loki.tasks.base import TaskEvalConfig, TaskEvaluator

__all__ = ["Task", "TaskEvalConfig", "TaskEvaluator", "eval_config", "evaluator_for", "kinds"]

_NOT_KINDS = {"base"}


def kinds() -> list[str]:
    """Every task kind: the modules of this package (but `base`)."""
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in _NOT_KINDS and not m.name.startswith("_"))


def _module(kind: Any):
    if not isinstance(kind, str) or kind not in kinds():
        checks.fail(checks.key("kind"), "one of " + ", ".join(kinds()), kind)
    return importlib.import_module(f"loki.tasks.{kind}")


def schema_of(kind: str) -> type[TaskEvalConfig]:
    """The `Config` dataclass of a task kind (its `task.eval` schema)."""
    return _module(kind).Config


def eval_config(task_eval: Mapping[str, Any], where: str = "task.eval") -> TaskEvalConfig:
    """`task.eval` as its kind's typed `Config`, every value checked (one-sentence `LokiError`s naming
    `<where>.<key>`), the primary metric included."""
    values = dict(task_eval)
    with checks.located(where):
        cls = schema_of(values.get("kind"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            checks.fail(checks.key(unknown[0]), f"absent: task kind {values['kind']!r} has no such setting (it has {', '.join(sorted(known))})", values[unknown[0]])
        config = cls(**values)
        _module(config.kind).Evaluator(config).check_primary()
    return config


def settings_of(kind: str, task_eval: Mapping[str, Any] | TaskEvalConfig) -> TaskEvalConfig:
    """`task.eval` of a `kind` task typed and checked: a mapping (or DictConfig) gets the kind's defaults."""
    if isinstance(task_eval, schema_of(kind)):
        return task_eval
    from loki.schema import plain

    return eval_config({"kind": kind, **plain(task_eval)})


def evaluator_for(task_eval: Mapping[str, Any] | TaskEvalConfig, where: str = "task.eval") -> TaskEvaluator:
    """The evaluator of a `task.eval` block (a mapping or an already checked `Config`)."""
    config = task_eval if isinstance(task_eval, TaskEvalConfig) else eval_config(task_eval, where)
    return _module(config.kind).Evaluator(config)


class Task:
    """One task: `name`, its training data (`datamodule`), its evaluator, and its primary metric."""

    def __init__(self, name: str, data: Any, task_eval: Mapping[str, Any] | TaskEvalConfig | None):
        self.name = name
        self.data = data
        self.evaluator = evaluator_for(task_eval) if task_eval is not None else None

    @classmethod
    def from_config(cls, task_cfg: Any) -> "Task":
        """From the composed `cfg.task` (a DictConfig or a plain mapping), checked."""
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(task_cfg, resolve=True) if OmegaConf.is_config(task_cfg) else dict(task_cfg)
        name = checks.text("task.name", plain.get("name"))
        return cls(name, task_cfg.get("data"), plain.get("eval"))

    @property
    def primary(self) -> str | None:
        return self.evaluator.config.primary if self.evaluator is not None else None

    @property
    def has_val(self) -> bool:
        return self.evaluator is not None and bool(self.evaluator.has_val)

    def datamodule(self, tokenizer, seed: int):
        if self.data is None:
            raise LokiError(f"task {self.name!r} has no training data (task.data is null).")
        from hydra.utils import instantiate

        return instantiate(self.data, tokenizer=tokenizer, seed=seed)

    def evaluate(self, model, tokenizer, stage: str = "test", items: list | None = None) -> dict[str, float]:
        """The task metrics on `stage` ("test" or "val"); the model is put back in its mode afterwards."""
        if self.evaluator is None:
            return {}
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            return self.evaluator.evaluate(model, tokenizer, stage, items=items)
        finally:
            if was_training:
                model.train()
