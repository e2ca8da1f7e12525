"""BEIR sets in every layout the hub serves (BEIR's jsonl, mteb's and BeIR's parquet), qrels as BEIR's own
loader reads them, the pinned revisions, BM25 against bm25s itself, and the candidate cache. Offline."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import loki.data.beir as beir_module
from loki.data.beir import BEIR_SETS, bm25_scores, bm25_top, load_beir, read_qrels, resolve_set
from loki.errors import LokiError

SMALL = Path(__file__).parent / "fixtures" / "beir_bm25"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _qrels_rows(split: str = "test") -> list[dict]:
    return _rows(SMALL / "qrels" / f"{split}.jsonl")


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _write(root: Path, layout: str) -> Path:
    """The SMALL fixture rewritten in one layout."""
    corpus, queries, qrels = _rows(SMALL / "corpus.jsonl"), _rows(SMALL / "queries.jsonl"), _qrels_rows()
    root.mkdir(parents=True)
    tsv = "query-id\tcorpus-id\tscore\n" + "".join(f"{r['query-id']}\t{r['corpus-id']}\t{r['score']}\n" for r in qrels)
    if layout == "jsonl+tsv":  # BEIR's zips
        (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
        (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
        (root / "qrels").mkdir()
        (root / "qrels" / "test.tsv").write_text(tsv)
    elif layout == "gzip":  # mteb's first uploads: corpus.jsonl.gz, queries.jsonl.gz
        with gzip.open(root / "corpus.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in corpus)
        with gzip.open(root / "queries.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in queries)
        (root / "qrels").mkdir()
        (root / "qrels" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qrels))
    elif layout == "mteb-parquet":  # configs corpus / queries / default, one shard each
        _parquet(root / "corpus" / "corpus-00000-of-00001.parquet", corpus)
        _parquet(root / "queries" / "queries-00000-of-00001.parquet", queries)
        _parquet(root / "default" / "test-00000-of-00001.parquet", qrels)
    elif layout == "sharded-parquet":  # `id` instead of `_id`, corpus in two shards, qrels under data/
        renamed = [{"id": r["_id"], **{k: v for k, v in r.items() if k != "_id"}} for r in corpus]
        _parquet(root / "corpus" / "corpus-00000-of-00002.parquet", renamed[:2])
        _parquet(root / "corpus" / "corpus-00001-of-00002.parquet", renamed[2:])
        _parquet(root / "queries.parquet", [{"id": r["_id"], "text": r["text"]} for r in queries])
        _parquet(root / "data" / "test-00000-of-00001.parquet", qrels)
    elif layout == "qrels-parquet":
        (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
        (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
        _parquet(root / "qrels" / "test.parquet", qrels)
    else:
        raise AssertionError(layout)
    return root


LAYOUTS = ["jsonl+tsv", "gzip", "mteb-parquet", "sharded-parquet", "qrels-parquet"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_the_same_set(tmp_path, layout, monkeypatch):
    monkeypatch.setenv("LOKI_BEIR_CACHE", str(tmp_path / "cache"))
    expected = load_beir(path=SMALL, candidates="bm25", top_n=100, cache=False)
    got = load_beir(path=_write(tmp_path / layout, layout), candidates="bm25", top_n=100)
    assert got.queries == expected.queries and got.qrels == expected.qrels
    assert got.candidates == expected.candidates == {"qa": ["a1", "a2"], "qb": ["a3", "a1"], "qc": ["qa"], "qd": []}
    assert got.corpus == expected.corpus
    whole = load_beir(path=tmp_path / layout, candidates="all")
    assert list(whole.corpus) == ["a1", "a2", "a3", "a4", "qa"]  # corpus order, across shards
    assert whole.corpus["a1"] == {"title": "", "text": "apple apple banana"}


def test_a_set_without_its_files_names_both_layouts(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(LokiError, match=r"no corpus.jsonl .*corpus/\*.parquet"):
        load_beir(path=tmp_path)


# ------------------------------------------------------------------------------------------------ qrels


@pytest.mark.parametrize(
    "text",
    [
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td3\t2\n",  # BEIR's header
        "qid\tdocid\trel\nq1\td1\t1\nq1\td2\t0\nq2\td3\t2\n",  # another header: skipped all the same
        "query-id corpus-id score\nq1 d1 1\nq1  d2 0\nq2 d3 2\n",  # space separated
        "q0\td0\t1\r\nq1\td1\t1\r\n\r\nq1\td2\t0\r\nq2\td3\t2.0\r\n",  # no header: BEIR drops the first line too
    ],
)
def test_qrels_are_read_as_beirs_loader_reads_them(tmp_path, text):
    path = tmp_path / "test.tsv"
    path.write_text(text)
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}


def test_bad_qrels_lines_are_refused(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("header\nq1\td1\n")
    with pytest.raises(LokiError, match="line 2 has 2 field"):
        read_qrels(path)
    path.write_text("header\nq1\td1\thigh\n")
    with pytest.raises(LokiError, match="score 'high'"):
        read_qrels(path)


# ------------------------------------------------------------------------------------------------ pins


def test_hub_sets_are_pinned_to_mtebs_revisions(tmp_path, monkeypatch):
    for name, (source, revision) in BEIR_SETS.items():
        if source.endswith(".zip"):  # BEIR's own zips: no revision exists
            assert name in ("trec-covid-v2", "vihealthqa") and revision is None
        else:
            assert source.startswith("mteb/") and len(revision) == 40 and int(revision, 16) >= 0, name
    assert BEIR_SETS["dbpedia-entity"] == ("mteb/dbpedia", "c0f706b76e590d620bd6618b3ca8efdd34e2d659")

    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        assert repo_type == "dataset" and "corpus/*" in allow_patterns and "corpus.jsonl*" in allow_patterns
        return str(SMALL)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    root, origin, display = resolve_set("fiqa")
    assert calls[-1] == ("mteb/fiqa", "27a168819829fe9bcd655c2df245fb19452e8e06") and display == "fiqa"
    assert origin == "mteb/fiqa@27a168819829fe9bcd655c2df245fb19452e8e06"
    resolve_set("someone/their-set@abc123")
    assert calls[-1] == ("someone/their-set", "abc123")
    load_beir(source="someone/other-set")
    assert calls[-1] == ("someone/other-set", None)  # not pinned: the repo's main branch


# ------------------------------------------------------------------------------------------------ BM25


def _random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)] + ["the", "and", "of", "a", "x", "Apple", "apple", "APPLE's", "café"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 25))) for _ in range(n)]


def test_bm25_equals_bm25s_to_the_bit():
    import bm25s

    texts = _random_texts(0, 400)
    queries = _random_texts(1, 30) + ["w1 w1 w2", "apple", "nothing-known zzz", ""]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False, return_ids=False)
    ours = bm25_scores(iter(texts), queries)
    for query, got in zip(tokens, ours):
        expected = retriever.get_scores(query) if query else np.zeros(len(texts), dtype=np.float32)
        assert got.dtype == np.float32 and np.array_equal(got, expected)
    # The top-n: score > 0, best first, equal scores (duplicated texts tie) by corpus order.
    for q, got in enumerate(bm25_top(iter(texts), queries, 10)):
        s = ours[q]
        ranked = sorted((i for i in range(len(texts)) if s[i] > 0), key=lambda i: (-s[i], i))[:10]
        assert got == ranked


def test_bm25_keeps_only_the_candidates_texts(tmp_path, monkeypatch):
    monkeypatch.setenv("LOKI_BEIR_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "big"
    (root / "qrels").mkdir(parents=True)
    texts = _random_texts(2, 3000)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"w{i} w{i + 1}"}) + "\n" for i in range(5)))
    (root / "qrels" / "test.tsv").write_text("h\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(5)) + "q0\tnot-in-corpus\t1\n")
    got = load_beir(path=root, candidates="bm25", top_n=7)
    assert all(len(c) == 7 for c in got.candidates.values())
    assert set(got.corpus) == {d for c in got.candidates.values() for d in c}  # nothing else is kept
    assert got.qrels["q0"] == {"d0": 1}  # a judged document missing from the corpus is dropped, as before


# ------------------------------------------------------------------------------------------------ cache


def test_bm25_candidates_are_cached_and_a_second_run_reads_no_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LOKI_BEIR_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "set"
    shutil.copytree(SMALL, root)
    first = load_beir(path=root, candidates="bm25", top_n=100)
    assert len(list((tmp_path / "cache" / "candidates").glob("*.json.gz"))) == 1

    def no_corpus(*args, **kwargs):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(beir_module, "_iter_corpus", no_corpus)
    second = load_beir(path=root, candidates="bm25", top_n=100)
    assert (second.candidates, second.corpus, second.qrels, second.queries) == (
        first.candidates, first.corpus, first.qrels, first.queries,
    )
    # What the candidates depend on is in the key: the query count, top_n and the set's files.
    for changed in (dict(max_queries=2), dict(top_n=1)):
        with pytest.raises(AssertionError, match="the corpus was read"):
            load_beir(path=root, candidates="bm25", **{"top_n": 100, **changed})
    stat = (root / "corpus.jsonl").stat()
    os.utime(root / "corpus.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="the corpus was read"):
        load_beir(path=root, candidates="bm25", top_n=100)
