"""retrieval_metrics = BEIR's EvaluateRetrieval.evaluate (trec_eval through pytrec_eval), on cases worked by hand,
including the ones where torchmetrics' definitions (which this project used before) give other numbers."""

from __future__ import annotations

import math

import pytest

from loki.errors import LokiError
from loki.eval.reranker import retrieval_metrics


def log2(x):
    return math.log(x, 2)


def test_map_at_1_divides_by_all_relevant_documents():
    # Two relevant docs, the first one ranked 1st: trec_eval's map_cut_1 = (1/1) / 2 relevant = 0.5
    # (torchmetrics' RetrievalMAP(top_k=1) says 1.0: it divides by the relevant docs found in the top k).
    got = retrieval_metrics({"q": {"r1": 3.0, "x": 2.0, "r2": 1.0}}, {"q": {"r1": 1, "r2": 1}}, ks=(1, 3))
    assert got["map@1"] == pytest.approx(0.5)
    assert got["recall@1"] == pytest.approx(0.5)
    assert got["p@1"] == pytest.approx(1.0)
    assert got["ndcg@1"] == pytest.approx(1.0)
    # @3: hits at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2.
    assert got["map@3"] == pytest.approx((1 + 2 / 3) / 2)
    assert got["ndcg@3"] == pytest.approx((1 + 1 / log2(4)) / (1 + 1 / log2(3)))


def test_relevant_document_missing_from_the_candidates_is_a_miss():
    # Relevant: r1 (ranked 2nd) and r2 (not a candidate at all). torchmetrics would compute recall over the
    # relevant candidates only (1/1) and AP over them (1/2); trec_eval divides both by R = 2.
    got = retrieval_metrics({"q": {"x": 2.0, "r1": 1.0}}, {"q": {"r1": 1, "r2": 1}}, ks=(10,))
    assert got["recall@10"] == pytest.approx(1 / 2)
    assert got["map@10"] == pytest.approx((1 / 2) / 2)
    assert got["p@10"] == pytest.approx(1 / 10)  # divided by k even with 2 candidates
    # Ideal ranking: both relevant docs at ranks 1 and 2, although r2 was never scored.
    assert got["ndcg@10"] == pytest.approx((1 / log2(3)) / (1 + 1 / log2(3)))


def test_graded_ndcg_and_negative_grades():
    # Grades d1: 2, d2: 1, d3: -1 (trec_eval: negative = not relevant, gain 0). Ranked d3, d2, d1.
    got = retrieval_metrics({"q": {"d3": 3.0, "d2": 2.0, "d1": 1.0}}, {"q": {"d1": 2, "d2": 1, "d3": -1}}, ks=(1, 3))
    assert got["ndcg@1"] == 0.0
    assert got["ndcg@3"] == pytest.approx((1 / log2(3) + 2 / log2(4)) / (2 + 1 / log2(3)))
    assert got["map@3"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert got["p@1"] == 0.0


def test_ties_are_broken_by_document_id_descending():
    # trec_eval sorts equal scores by docno in reverse string order: d9 > d10 > d1.
    qrels = {"q": {"d9": 1}}
    tied = {"q": {"d1": 1.0, "d10": 1.0, "d9": 1.0}}
    assert retrieval_metrics(tied, qrels, ks=(1,))["p@1"] == 1.0
    assert retrieval_metrics(tied, {"q": {"d10": 1}}, ks=(1, 2))["p@1"] == 0.0  # d10 is 2nd
    assert retrieval_metrics(tied, {"q": {"d10": 1}}, ks=(1, 2))["map@2"] == pytest.approx(1 / 2)


def test_which_queries_are_averaged():
    scores = {
        "a": {"d1": 2.0, "d2": 1.0},  # relevant d1 first: p@1 = 1
        "b": {"d1": 1.0},  # judged, but only with score 0: left out (as BEIR loads it, no relevant doc)
        "c": {},  # judged query without candidates: 0 everywhere, and counted
        "z": {"d1": 5.0},  # not in the qrels: left out
    }
    qrels = {"a": {"d1": 1}, "b": {"d1": 0}, "c": {"d3": 1}, "e": {"d1": 1}}  # e: not scored, left out
    got = retrieval_metrics(scores, qrels, ks=(1,))
    assert got == pytest.approx({"map@1": 1 / 2, "ndcg@1": 1 / 2, "recall@1": 1 / 2, "p@1": 1 / 2})


def test_a_document_with_its_query_id_is_ignored():
    # BEIR's ignore_identical_ids (ArguAna, Quora): q itself would be ranked 1st, it is dropped.
    got = retrieval_metrics({"q": {"q": 9.0, "d1": 1.0}}, {"q": {"d1": 1}}, ks=(1,))
    assert got["p@1"] == 1.0


def test_no_judged_query_is_an_error():
    with pytest.raises(LokiError, match="relevant document"):
        retrieval_metrics({"q": {"d1": 1.0}}, {"q": {"d1": 0}}, ks=(1,))
