"""Reading a run's metrics.json: the one place that knows where task metrics and retention live.

Two layouts exist. Runs made before the task interface (issue 17) keep the facts task's accuracy among the
retention benchmarks (`retention.after["retention/toy_facts_test/acc"]`, and `toy_facts_val`) and put the
reranker's metrics in `task_metrics`. Newer runs keep every task metric out of retention: `task_metrics`
(test stage), `task_metrics_val` (validation stage) and `primary_metric` (the name of the primary one).
Both are read here, so the committed runs under docs/ still tabulate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

NAN = float("nan")
# the facts task of the old layout: its two cloze-QA splits were retention benchmarks
LEGACY_TASK_BENCHMARKS = {"test": "toy_facts_test", "val": "toy_facts_val"}
TASK_STAGES = {"test": "task_metrics", "val": "task_metrics_val"}


def find(values: Mapping[str, Any] | None, name: str) -> float:
    """The value whose key is `name` or ends with "/name" (metrics carry prefixes such as "task/"); nan if none."""
    for key, value in (values or {}).items():
        if key == name or key.endswith("/" + name):
            return NAN if value is None else float(value)
    return NAN


def task_metric(run: Mapping[str, Any], name: str | None = None, stage: str = "test") -> float:
    """The task metric `name` (None: the run's primary metric) on the test or validation stage; nan if absent."""
    name = name or run.get("primary_metric") or "acc"
    value = find(run.get(TASK_STAGES[stage]), name)
    if math.isnan(value):  # the old layout: the facts task's accuracy was a retention benchmark
        value = retention_value((run.get("retention") or {}).get("after"), LEGACY_TASK_BENCHMARKS[stage], name)
    return value


def base_task_metric(run: Mapping[str, Any], name: str = "acc", stage: str = "test") -> float:
    """The facts task's metric of the model before training, as a run recorded it (old layout only; nan otherwise)."""
    return retention_value((run.get("retention") or {}).get("before"), LEGACY_TASK_BENCHMARKS[stage], name)


def retention_value(retention: Mapping[str, Any] | None, benchmark: str, measure: str) -> float:
    """One retention measure, e.g. ("mmlu_cloze", "acc") -> retention["retention/mmlu_cloze/acc"]; nan if absent."""
    value = (retention or {}).get(f"retention/{benchmark}/{measure}")
    return NAN if value is None else float(value)


def retention(run: Mapping[str, Any], stage: str = "after") -> dict:
    """The retention benchmarks' results before or after training, without the old layout's task benchmarks."""
    values = (run.get("retention") or {}).get(stage) or {}
    legacy = tuple(f"retention/{name}/" for name in LEGACY_TASK_BENCHMARKS.values())
    return {key: value for key, value in values.items() if not key.startswith(legacy)}


def forgetting_avg(run: Mapping[str, Any]) -> float:
    """The run's forgetting Avg (%) over its retention benchmarks; nan when it measured none."""
    report = run.get("forgetting")
    return NAN if not report or report.get("avg") is None else float(report["avg"])


def val_loss(run: Mapping[str, Any]) -> float:
    """The last validation's loss; nan when the run did not record one."""
    value = run.get("val_loss")
    return NAN if value is None else float(value)


def trainable(run: Mapping[str, Any]) -> int | None:
    """The number of parameters the run trained (effective, LoKI's rows counted once)."""
    return (run.get("trainable") or {}).get("trainable_effective")
