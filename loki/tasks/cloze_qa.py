"""Task kind `cloze_qa`: multiple-choice questions (MMLU schema: question, choices, answer) scored as
cloze: each choice's log-likelihood after the question, the highest wins (`loki.eval.retention.score_cloze`).

Metrics: `acc` (top choice is the gold one), `acc_norm` (per byte of the choice), `logprob` (the gold
choice's mean log-probability among the choices: a graded measure, <= 0), `prob`, and `n`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loki import checks
from loki.tasks.base import TaskEvalConfig, TaskEvaluator


@dataclass
class Config(TaskEvalConfig):
    kind: Any = "cloze_qa"
    primary: Any = "acc"             # accuracy on the test questions
    path: Any = None                 # the test questions: a local MMLU-schema .jsonl file
    val_path: Any = None             # the validation questions (null: no validation stage)
    chat_template: Any = True        # the question in a user turn (false: plain "Question: ...\nAnswer:")
    batch_size: Any = 8              # sequences per forward pass when the choices are scored whole

    def __post_init__(self) -> None:
        super().__post_init__()
        k = checks.key
        checks.text(k("path"), self.path, optional=self._paths_derived())
        checks.text(k("val_path"), self.val_path, optional=True)
        checks.boolean(k("chat_template"), self.chat_template)
        checks.integer(k("batch_size"), self.batch_size, low=1)

    def _paths_derived(self) -> bool:
        return False

    def files(self) -> tuple[Path, Path | None]:
        return Path(str(self.path)).expanduser(), (Path(str(self.val_path)).expanduser() if self.val_path else None)


class Evaluator(TaskEvaluator):
    MEASURES = ("acc", "acc_norm", "logprob", "prob", "n")

    @property
    def has_val(self) -> bool:  # type: ignore[override]
        return self.config.files()[1] is not None

    def metrics(self) -> set[str]:
        return set(self.MEASURES)

    def evaluate(self, model, tokenizer, stage: str = "test", items: list | None = None) -> dict[str, float]:
        from loki.data.mmlu import load_mmlu
        from loki.errors import LokiError
        from loki.eval.retention import score_cloze

        test, val = self.config.files()
        path = val if stage == "val" else test
        if path is None:
            raise LokiError(f"task.eval.val_path is null, so the task has no validation stage (stage={stage!r}).")
        rows = load_mmlu(source=None, path=str(path), split="test", per_subject=None)
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            out = score_cloze(model, tokenizer, rows, int(self.config.batch_size), bool(self.config.chat_template), items=items)
        finally:
            if was_training:
                model.train()
        out["n"] = float(len(rows))
        return out
