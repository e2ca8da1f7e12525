"""BEIR sets as the LB reranker's evaluation uses them: BM25 top-n candidates, the first N queries by id,
several sets with their mean, qrels as JSON lines, local copies. Offline, on small fixtures."""

from __future__ import annotations

import math
import zipfile
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from loki.data.beir import BEIR_SETS, LB_EVAL_SETS, bm25_candidates, load_beir
from loki.errors import LokiError
from loki.eval import run_task_eval
from loki.eval.reranker import NOT_COMPARABLE_KEY, digit_token_ids

SMALL = "tests/fixtures/beir_bm25"  # 5 docs: a1 "apple apple banana", a2 "apple cherry", a3 "banana cherry date",
BEIR = "tests/fixtures/beir"  #        a4 "elderberry fig", qa "apple grape pie"

# BM25 by hand (bm25s' Lucene variant, k1 = 1.5, b = 0.75): N = 5 docs, lengths 3, 2, 3, 2, 3 -> avgdl = 2.6;
# idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)); term score = idf * tf / (tf + k1 (1 - b + b dl / avgdl))
# (Lucene's form: without the classic (k1 + 1) factor in the numerator, which scales every score alike).
K1, B, AVGDL = 1.5, 0.75, 13 / 5


def _term(tf, dl, df):
    idf = math.log(1 + (5 - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + K1 * (1 - B + B * dl / AVGDL))


HAND_SCORES = {
    # "apple" (df 3, idf 0.5390): a1 tf 2, dl 3 -> 0.2935; a2 tf 1, dl 2 -> 0.2406; doc qa tf 1, dl 3 -> 0.2016.
    "qa": {"a1": _term(2, 3, 3), "a2": _term(1, 2, 3), "qa": _term(1, 3, 3)},
    # "banana" (df 2, idf 0.8755) + "date" (df 1, idf 1.3863): a3 0.3275 + 0.5186 = 0.8461; a1 0.3275.
    "qb": {"a3": _term(1, 3, 2) + _term(1, 3, 1), "a1": _term(1, 3, 2)},
    "qc": {"qa": _term(1, 3, 1)},  # "grape" (df 1)
}


def test_bm25_scores_match_the_hand_computation():
    import bm25s

    beir = load_beir(path=SMALL, candidates="all")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([d["text"] for d in beir.corpus.values()], stopwords="en", show_progress=False), show_progress=False)
    ids = list(beir.corpus)
    for query, expected in HAND_SCORES.items():
        tokens = bm25s.tokenize([beir.queries[query]], stopwords="en", show_progress=False, return_ids=False)[0]
        got = dict(zip(ids, retriever.get_scores(tokens).tolist()))
        for doc in ids:
            assert got[doc] == pytest.approx(expected.get(doc, 0.0), rel=1e-5), (query, doc)
    assert HAND_SCORES["qa"]["a1"] == pytest.approx(0.2935, abs=1e-4)
    assert HAND_SCORES["qb"]["a3"] == pytest.approx(0.8461, abs=1e-4)


def test_bm25_candidates_by_hand():
    beir = load_beir(path=SMALL, candidates="bm25", top_n=100)
    # qa: a1 > a2 > (doc qa: its own id, never a candidate); a3, a4 match no word: left out.
    # qb: a3 > a1. qc: doc qa (another query's id is fine). qd: all stopwords -> nothing. qe: no relevant doc.
    assert beir.candidates == {"qa": ["a1", "a2"], "qb": ["a3", "a1"], "qc": ["qa"], "qd": []}
    assert load_beir(path=SMALL, candidates="bm25", top_n=1).candidates["qb"] == ["a3"]
    whole = load_beir(path=SMALL, candidates="all")  # bm25_candidates ranks the documents of beir.corpus
    assert bm25_candidates(whole, top_n=3)["qa"] == ["a1", "a2", "qa"]  # before the identical-id filter


def test_queries_are_the_first_n_judged_by_id_and_qrels_read_from_jsonl():
    beir = load_beir(path=SMALL)
    assert list(beir.queries) == ["qa", "qb", "qc", "qd"]  # qe has only a score-0 judgement
    assert beir.qrels["qb"] == {"a3": 2, "a4": 1}
    assert list(load_beir(path=SMALL, max_queries=2).queries) == ["qa", "qb"]


class ConstantReranker(torch.nn.Module):
    """The same digit distribution for every prompt: all scores tie, so trec_eval ranks by doc id, descending."""

    def __init__(self, tokenizer):
        super().__init__()
        self.vocab, self.digit_ids = len(tokenizer), digit_token_ids(tokenizer)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[:, :, self.digit_ids[3]] = 5.0
        return SimpleNamespace(logits=logits)


def _cfg(**overrides):
    cfg = OmegaConf.load("conf/task/tiny_rerank.yaml").eval
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def log2(x):
    return math.log(x, 2)


# BM25 candidates of SMALL, all scores tied -> ranked by id descending:
#   qa: a2, a1 (relevant a2, a4; a4 never retrieved)   qb: a3, a1 (relevant a3: 2, a4: 1)
#   qc: qa (relevant)                                   qd: no candidates (relevant a1): 0 everywhere
SMALL_BM25 = {
    "map@1": (1 / 2 + 1 / 2 + 1 + 0) / 4,
    "recall@1": (1 / 2 + 1 / 2 + 1 + 0) / 4,
    "p@1": (1 + 1 + 1 + 0) / 4,
    "ndcg@1": (1 + 1 + 1 + 0) / 4,
    "map@10": (1 / 2 + 1 / 2 + 1 + 0) / 4,
    "recall@10": (1 / 2 + 1 / 2 + 1 + 0) / 4,
    "p@10": (1 / 10 + 1 / 10 + 1 / 10 + 0) / 4,
    "ndcg@10": (1 / (1 + 1 / log2(3)) + 2 / (2 + 1 / log2(3)) + 1 + 0) / 4,
}


def test_bm25_rerank_end_to_end_by_hand(chat_tokenizer):
    got = run_task_eval(ConstantReranker(chat_tokenizer), chat_tokenizer, _cfg(path=SMALL, candidates="bm25", top_n=100))
    assert got["num_queries"] == 4 and got["num_pairs"] == 5
    for key, value in SMALL_BM25.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert NOT_COMPARABLE_KEY not in got


def test_several_sets_are_reported_with_their_mean(chat_tokenizer):
    cfg = _cfg(path=None, sets=[SMALL, BEIR], candidates="all")
    got = run_task_eval(ConstantReranker(chat_tokenizer), chat_tokenizer, cfg)
    # candidates=all, ties by id descending. SMALL: qa -> a4 (doc qa excluded) relevant; qb -> doc qa, no;
    # qc -> doc qa, relevant; qd -> doc qa, no: p@1 = 2/4. BEIR fixture: d6 first for every query: p@1 = 0.
    assert got["beir_bm25/p@1"] == pytest.approx(0.5)
    assert got["beir/p@1"] == 0.0
    assert got["p@1"] == pytest.approx(0.25)
    for key in ("map@10", "ndcg@10", "recall@1"):
        assert got[key] == pytest.approx((got[f"beir_bm25/{key}"] + got[f"beir/{key}"]) / 2)
    assert got["beir_bm25/num_queries"] == 4 and got["beir/num_queries"] == 3 and got["num_queries"] == 7
    assert list(got)[0] == "map@1"  # the means come first (suffix lookups find them)


def test_sets_by_name_from_a_local_data_dir(tmp_path, chat_tokenizer):
    import shutil

    shutil.copytree(SMALL, tmp_path / "scifact")
    beir = load_beir(name="scifact", data_dir=tmp_path, candidates="bm25")
    assert beir.name == "scifact" and beir.candidates["qb"] == ["a3", "a1"]
    with pytest.raises(LokiError, match="not in task.eval.data_dir"):
        load_beir(name="fiqa", data_dir=tmp_path)
    with pytest.raises(LokiError, match="unknown BEIR set 'nosuchset'"):
        load_beir(name="nosuchset")
    got = run_task_eval(ConstantReranker(chat_tokenizer), chat_tokenizer, _cfg(path=None, sets=["scifact"], data_dir=str(tmp_path), candidates="bm25", top_n=100))
    assert got["ndcg@10"] == pytest.approx(SMALL_BM25["ndcg@10"]) and "scifact/ndcg@10" not in got


def test_judged_candidates_are_labelled_not_comparable(chat_tokenizer):
    got = run_task_eval(ConstantReranker(chat_tokenizer), chat_tokenizer, _cfg(candidates="judged", num_negatives=1))
    assert got[NOT_COMPARABLE_KEY] == 1.0 and got["num_pairs"] == 5 + 3  # judged docs + 1 negative per query


def test_a_beir_zip_is_fetched_once_and_read(tmp_path, monkeypatch):
    archive = tmp_path / "toyset.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.jsonl"):
            zf.write(f"{SMALL}/{name}", f"toyset/{name}")
    monkeypatch.setitem(BEIR_SETS, "toyset", (archive.as_uri(), None))  # a file:// URL: no network
    monkeypatch.setenv("LOKI_BEIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LokiError, match="not cached"):
        load_beir(name="toyset")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert list(load_beir(name="toyset").queries) == ["qa", "qb", "qc", "qd"]
    assert (tmp_path / "cache" / "toyset" / "queries.jsonl").is_file()
    archive.unlink()  # the cached copy is used from now on
    assert load_beir(name="toyset", max_queries=1).name == "toyset"


def test_reranker_task_defaults_are_the_lb_evaluation():
    from tests.conftest import compose_config

    cfg = compose_config("train", "task=reranker").task.eval  # the YAML plus its schema defaults
    assert list(cfg.sets) == list(LB_EVAL_SETS) == [
        "arguana", "dbpedia-entity", "fiqa", "nfcorpus", "scidocs", "scifact", "trec-covid-v2", "vihealthqa",
        "webis-touche2020",
    ]
    assert cfg.candidates == "bm25" and cfg.top_n == 100 and cfg.max_queries == 250 and cfg.split == "test"
    assert all(name in BEIR_SETS for name in cfg.sets + cfg.val_sets)
    assert cfg.score == "reference"  # lightblue's score: the paper's numbers are comparable
