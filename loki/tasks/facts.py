"""Task kind `facts`: the toy world's invented facts (`loki.toy.facts_task`), asked with held-out
paraphrases and scored as cloze QA: `val.jsonl` (the third paraphrase, for choosing the LR) and
`test.jsonl` (the fourth, reported). The files are a pure function of (seed, lands) and are written
on first use, so the evaluator works without the training data module (`python -m loki.evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loki import checks
from loki.tasks import cloze_qa


@dataclass
class Config(cloze_qa.Config):
    kind: Any = "facts"
    seed: Any = 0                    # toy world seed (loki.toy.world.generate_world)
    lands: Any = 10                  # the first N lands x 6 relations are the facts
    cache_dir: Any = None            # where the files are written (null: $LOKI_CACHE or ~/.cache/loki)

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.integer(checks.key("seed"), self.seed)
        checks.integer(checks.key("lands"), self.lands, low=1)

    def _paths_derived(self) -> bool:
        return True

    def files(self) -> tuple[Path, Path | None]:
        from loki.toy.facts_task import ensure

        folder = ensure(self.cache_dir, int(self.seed), int(self.lands))
        return (Path(self.path) if self.path else folder / "test.jsonl"), (Path(self.val_path) if self.val_path else folder / "val.jsonl")


class Evaluator(cloze_qa.Evaluator):
    pass
