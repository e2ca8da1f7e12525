"""Task kind `bfcl`: function calls generated greedily, checked with BFCL's own AST checker (`loki.eval.bfcl`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loki import checks
from loki.tasks.base import TaskEvalConfig, TaskEvaluator


@dataclass
class Config(TaskEvalConfig):
    kind: Any = "bfcl"
    primary: Any = "bfcl/overall/acc"  # the leaderboard's AST columns, averaged
    data_dir: Any = None             # null: the data bfcl-eval ships; or a dir of BFCL_v4_<category>.json + possible_answer/
    categories: Any = None           # AST categories to score (null: every one scorable offline)
    max_samples: Any = None          # entries per category (null: all)
    val_max_samples: Any = 10        # entries per category for the per-validation metric
    max_new_tokens: Any = 256        # greedy generation budget per answer
    max_length: Any = 4096           # longest prompt accepted
    batch_size: Any = 8              # prompts per generate call (left-padded)
    log_responses: Any = False       # log every raw response and verdict

    def __post_init__(self) -> None:
        super().__post_init__()
        from loki.eval.bfcl import AST_CATEGORIES, CATEGORY_ALIASES

        k = checks.key
        checks.text(k("data_dir"), self.data_dir, optional=True)
        checks.string_list(k("categories"), self.categories)
        for category in self.categories or ():
            checks.one_of(k("categories"), category, (*AST_CATEGORIES, *CATEGORY_ALIASES))
        checks.integer(k("max_samples"), self.max_samples, low=1, optional=True)
        checks.integer(k("val_max_samples"), self.val_max_samples, low=1, optional=True)
        checks.integer(k("max_new_tokens"), self.max_new_tokens, low=1)
        checks.integer(k("max_length"), self.max_length, low=8)
        checks.integer(k("batch_size"), self.batch_size, low=1)
        checks.boolean(k("log_responses"), self.log_responses)


class Evaluator(TaskEvaluator):
    def metrics(self) -> set[str]:
        from loki.eval.bfcl import AST_CATEGORIES

        names = {f"bfcl/{c}/acc" for c in (self.config.categories or AST_CATEGORIES)}
        return names | {
            "bfcl/non_live/acc", "bfcl/live/acc", "bfcl/hallucination/irrelevance_acc",
            "bfcl/hallucination/relevance_acc", "bfcl/overall/acc", "bfcl/core5/acc", "bfcl/overall/acc_micro",
        }

    def evaluate(self, model, tokenizer, stage: str = "test", items: list | None = None) -> dict[str, float]:
        from loki.eval.bfcl import evaluate_bfcl

        return evaluate_bfcl(model, tokenizer, self.config, stage)
