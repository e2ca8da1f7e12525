"""The random-ranking baseline of a reranking task: what a reranker that orders its candidates at random scores.

`expected_random_ndcg` is exact: under a uniformly random order each of a query's N candidates sits at
each rank r with probability 1/N, so E[DCG@k] = (sum of the candidates' gains / N) * sum_{r <= min(k, N)}
1/log2(r + 1), and the ideal DCG does not depend on the order. This is trec_eval's `ndcg_cut` (gain = the
graded relevance, negative grades 0), as `loki.eval.reranker.retrieval_metrics` computes it.
`random_ranking_metrics` also averages every metric over seeded shuffles through that same function.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any


def _judged(candidates: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> list[str]:
    return [q for q in candidates if q in qrels and any(int(s) > 0 for s in qrels[q].values())]


def expected_random_ndcg(candidates: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], k: int) -> float:
    """Exact expected NDCG@k of a uniformly random ordering of each query's candidates, averaged over judged queries."""
    judged = _judged(candidates, qrels)
    total = 0.0
    for q in judged:
        docs = [d for d in candidates[q] if d != q]
        gains = {d: max(0, int(s)) for d, s in qrels[q].items()}
        ideal = sorted(gains.values(), reverse=True)[:k]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        if not docs or idcg == 0:
            continue
        discount = sum(1 / math.log2(r + 2) for r in range(min(k, len(docs))))
        total += sum(gains.get(d, 0) for d in docs) / len(docs) * discount / idcg
    return total / len(judged)


def _reranker_settings(eval_cfg: Any) -> Any:
    """`task.eval` of a reranker task (a mapping or a DictConfig; missing keys take the schema's defaults),
    typed and checked (loki.tasks.reranker.Config)."""
    from loki.schema import plain
    from loki.tasks import eval_config

    return eval_config({"kind": "reranker", **plain(eval_cfg)})


def random_ranking_metrics(eval_cfg: Mapping[str, Any], shuffles: int = 200, seed: int = 0) -> dict[str, float]:
    """Every metric of a reranker evaluation (`task.eval`, one local BEIR set) under random candidate orders.

    `ndcg@k` is the exact expectation; the other metrics are means over `shuffles` seeded random orders
    (`ndcg@k_shuffled` keeps the shuffled mean of NDCG too, as a check)."""
    from loki.data.beir import load_beir
    from loki.eval.reranker import retrieval_metrics

    settings = _reranker_settings(eval_cfg)
    beir = load_beir(
        path=settings.path,
        source=settings.source,
        split=settings.split,
        max_queries=settings.max_queries,
        candidates=str(settings.candidates),
        num_negatives=int(settings.num_negatives),
        top_n=settings.top_n,
        seed=int(settings.seed),
    )
    ks = tuple(int(k) for k in settings.ks)
    rng = random.Random(seed)
    sums: dict[str, float] = {}
    for _ in range(shuffles):
        # Distinct random scores: a random permutation, with no ties for trec_eval to break by document id.
        scores = {}
        for q, docs in beir.candidates.items():
            values = list(range(len(docs)))
            rng.shuffle(values)
            scores[q] = {d: float(v) for d, v in zip(docs, values)}
        for key, value in retrieval_metrics(scores, beir.qrels, ks).items():
            sums[key] = sums.get(key, 0.0) + value
    out = {key: value / shuffles for key, value in sums.items()} if shuffles else {}
    for k in ks:
        if shuffles:
            out[f"ndcg@{k}_shuffled"] = out[f"ndcg@{k}"]
        out[f"ndcg@{k}"] = expected_random_ndcg(beir.candidates, beir.qrels, k)
    out["shuffles"] = float(shuffles)
    return out
