"""Evaluation entry points train.py and `python -m loki.evaluate` call.

- `run_task_eval(model, tokenizer, task_eval_cfg, stage="test")`: the task metric (`cfg.task.eval`), by the
  evaluator its `kind` names in `loki.tasks` (reranker, bfcl, cloze_qa, facts).
- `run_retention(model, tokenizer, retention_cfg, reference_dir=None, stage=None)`: `cfg.eval` ->
  `retention/<benchmark>/<measure>`; `stage="before"` stores the base model's distributions for the `kl`
  benchmarks under `reference_dir`, `stage="after"` compares against them (loki.eval.retention).
- `check_disjoint(attribution_data, retention_cfg)`: LokiError when retention would read attribution rows.
- `forgetting_report(before, after)`: the paper's forgetting score, per-benchmark deltas, KL and LM loss.
- `format_report(metrics)`: a short printable table of a run's metrics.json dict.
- `TaskMetricCallback(task)`: the task metric on the validation split, logged as `val/<metric>`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from loki.errors import LokiError
from loki.eval.forgetting import forgetting_report, forgetting_score
from loki.eval.retention import check_disjoint, reference_ready, run_retention

__all__ = [
    "TaskMetricCallback",
    "check_disjoint",
    "format_report",
    "forgetting_report",
    "forgetting_score",
    "reference_ready",
    "run_retention",
    "run_task_eval",
]

# Counts that describe the evaluation rather than measure the model: reported, not logged as val/.
COUNT_KEYS = ("num_queries", "num_pairs", "candidates_judged_not_comparable")  # matched on the last key part


def run_task_eval(model, tokenizer, task_eval_cfg: Mapping[str, Any], stage: str = "test") -> dict[str, float]:
    """The task metrics of a `task.eval` block (its `kind` names the evaluator, `loki.tasks`) on the
    test (or `stage="val"`) data."""
    from loki.tasks import Task

    return Task("task", None, _plain(task_eval_cfg)).evaluate(model, tokenizer, stage)


def _plain(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


class TaskMetricCallback(pl.Callback):
    """Computes the task metric on `pl_module.model` at each validation epoch end; logs `val/<metric>`.

    The tokenizer comes from the constructor, else `pl_module.tokenizer`, else `trainer.datamodule.tokenizer`
    (ChatSFTDataModule keeps it). Sanity-check epochs are skipped. Values are logged with
    `rank_zero_only=True`: train.py attaches this callback on rank 0 only.
    """

    def __init__(self, task: Any, tokenizer=None):
        """`task`: a `loki.tasks.Task`, or a `task.eval` block."""
        super().__init__()
        from loki.tasks import Task

        self.task = task if isinstance(task, Task) else Task("task", None, _plain(task))
        self.tokenizer = tokenizer
        self.last: dict[str, float] = {}
        self.last_step: int | None = None  # the optimizer step `last` was measured at

    def _tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        for candidate in (self.tokenizer, getattr(pl_module, "tokenizer", None), getattr(trainer.datamodule, "tokenizer", None)):
            if candidate is not None:
                return candidate
        raise LokiError("TaskMetricCallback needs a tokenizer: pass one, or use a datamodule that keeps `tokenizer`.")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        model = getattr(pl_module, "model", pl_module)
        self.last = self.task.evaluate(model, self._tokenizer(trainer, pl_module), stage="val")
        self.last_step = trainer.global_step
        for key, value in self.last.items():
            if key.rsplit("/", 1)[-1] not in COUNT_KEYS:
                pl_module.log(f"val/{key}", float(value), rank_zero_only=True, logger=True, prog_bar=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_report(metrics: Mapping[str, Any]) -> str:
    """A short table of a run's metrics dict: header fields, task metrics, retention before/after/delta,
    and the forgetting score (keys as train.py writes metrics.json; missing sections are left out)."""
    lines = []
    header = [f"{k}={metrics[k]}" for k in ("model", "task", "method", "q", "steps") if metrics.get(k) is not None]
    if header:
        lines.append("  ".join(header))
    task = metrics.get("task_metrics") or {}
    if task:
        lines.append("task metric" + " " * 21 + "value")
        for key, value in task.items():
            lines.append(f"  {key:<30}{_fmt(value)}")
    forgetting = metrics.get("forgetting") or {}
    retention = metrics.get("retention") or {}
    benchmarks = forgetting.get("benchmarks") or {}
    if benchmarks:
        lines.append(f"{'retention':<32}{'before':>10}{'after':>10}{'delta':>10}")
        for bench, measures in benchmarks.items():
            for measure, row in measures.items():
                lines.append(
                    f"  {bench + '/' + measure:<30}{_fmt(row['before']):>10}{_fmt(row['after']):>10}{row['delta']:>+10.4f}"
                )
    elif retention.get("after") or retention.get("before"):
        side = retention.get("after") or retention.get("before")
        lines.append("retention" + " " * 23 + "value")
        for key, value in side.items():
            lines.append(f"  {key:<30}{_fmt(value)}")
    if forgetting:
        lines.append(
            f"forgetting (paper's Avg over {forgetting.get('n')} benchmark(s), {forgetting.get('measure')}): "
            f"{_fmt(forgetting.get('avg'))} %  (positive = ability lost)"
        )
        for bench, kl in (forgetting.get("kl") or {}).items():
            lines.append(f"  KL(base || tuned) on {bench}: {_fmt(kl)} nats")
        for bench, row in (forgetting.get("lm_loss") or {}).items():
            lines.append(
                f"  LM loss on {bench}: {_fmt(row['before'])} -> {_fmt(row['after'])} nats/token ({row['delta']:+.4f})"
            )
    return "\n".join(lines)
