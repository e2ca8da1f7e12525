"""Task kind `reranker`: score (query, document) pairs with the LB reranker prompt, rank BEIR candidates,
report BEIR's metrics (`loki.eval.reranker`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loki import checks
from loki.tasks.base import TaskEvalConfig, TaskEvaluator

CANDIDATES = ("bm25", "all", "judged")  # or the path of a run TSV
METRICS = ("map", "ndcg", "recall", "p")


@dataclass
class Config(TaskEvalConfig):
    kind: Any = "reranker"
    primary: Any = "ndcg@10"         # graded relevance; map@1 is the LB reranker's headline
    sets: Any = None                 # BEIR set names (null: `path`, else `source`, else the LB evaluation list)
    data_dir: Any = None             # a local folder with one BEIR directory per set name (null: download)
    path: Any = None                 # one local BEIR directory replaces `sets`
    source: Any = None               # one hub repo in BEIR layout, used when `sets` is null
    split: Any = "test"              # qrels split of the final task metric
    max_queries: Any = None          # the first N judged queries sorted by id, per set (null: all)
    val_sets: Any = None             # sets of the per-validation metric (null: `sets`)
    val_split: Any = None            # qrels split of the per-validation metric (null: `split`)
    val_max_queries: Any = None      # queries of the per-validation metric (null: all)
    candidates: Any = "bm25"         # bm25 (BM25 top_n, as published) | all | judged (fast, not comparable) | a run TSV path
    num_negatives: Any = 0           # random unjudged documents per query with candidates=judged
    top_n: Any = 100                 # documents per query from BM25 or a run file
    use_title: Any = True            # prepend the document title to its text
    ks: Any = field(default_factory=lambda: [1, 10])  # cut-offs of MAP, Recall, NDCG and P
    batch_size: Any = 16             # prompts per forward pass
    max_length: Any = 1024           # prompt tokens; documents are cut to fit
    seed: Any = 0                    # seeds the random negatives of candidates=judged
    score: Any = "expected"          # how a pair is scored from the digit probabilities (loki.eval.reranker)

    def __post_init__(self) -> None:
        super().__post_init__()
        k = checks.key
        checks.string_list(k("sets"), self.sets)
        checks.string_list(k("val_sets"), self.val_sets)
        for name in ("path", "data_dir", "source"):
            checks.text(k(name), getattr(self, name), optional=True)
        checks.text(k("split"), self.split)
        checks.text(k("val_split"), self.val_split, optional=True)
        checks.integer(k("max_queries"), self.max_queries, low=1, optional=True)
        checks.integer(k("val_max_queries"), self.val_max_queries, low=1, optional=True)
        if self.candidates not in CANDIDATES and not (isinstance(self.candidates, str) and Path(self.candidates).expanduser().is_file()):
            checks.fail(k("candidates"), "one of bm25, all, judged, or an existing run TSV file", self.candidates)
        checks.integer(k("num_negatives"), self.num_negatives, low=0)
        checks.integer(k("top_n"), self.top_n, low=1, optional=True)
        checks.boolean(k("use_title"), self.use_title)
        checks.int_list(k("ks"), self.ks)
        checks.integer(k("batch_size"), self.batch_size, low=1)
        checks.integer(k("max_length"), self.max_length, low=8)
        checks.integer(k("seed"), self.seed)
        from loki.eval import reranker

        checks.one_of(k("score"), self.score, getattr(reranker, "SCORES", ("expected",)))


class Evaluator(TaskEvaluator):
    def metrics(self) -> set[str]:
        base = {f"{m}@{int(c)}" for m in METRICS for c in self.config.ks}
        names = set(base)
        for set_name in self.config.sets or ():
            names |= {f"{set_name}/{m}" for m in base}
        return names

    def evaluate(self, model, tokenizer, stage: str = "test", items: list | None = None) -> dict[str, float]:
        from loki.eval.reranker import evaluate_reranker

        return evaluate_reranker(model, tokenizer, self.config, stage, items=items)
