"""BEIR-format retrieval sets and the candidates a reranker scores.

Layouts (a local directory, a hub dataset repo, or an unpacked BEIR zip), each file optionally gzipped:
- BEIR's own: `corpus.jsonl` {_id, title, text}, `queries.jsonl` {_id, text}, `qrels/<split>.tsv` or
  `qrels/<split>.jsonl` (fields `query-id`, `corpus-id`, `score`);
- parquet, as mteb's re-uploads and BeIR's hub copies hold them: `corpus/*.parquet` (or `corpus.parquet`),
  `queries/*.parquet` (or `queries.parquet`) with `_id` (or `id`), and the qrels of a split in
  `qrels/<split>.parquet`, `qrels/<split>-*.parquet`, `default/<split>-*.parquet` or `data/<split>-*.parquet`;
  also `<split>.tsv` at the top (BeIR's `<name>-qrels` repos).
TSV qrels are read as BEIR's `GenericDataLoader` reads them: the first line is skipped whatever it says,
then `query-id corpus-id score` per line, tab separated or, in a line without tabs, space separated.

Where a set comes from (`resolve_set`): a local directory; else `<data_dir>/<name>` when a data_dir is
given; else `BEIR_SETS[name]` (a hub repo at its pinned revision, fetched with
`huggingface_hub.snapshot_download`, or a BEIR zip URL, fetched once into the cache dir); else the name
itself as a hub repo (`org/name`, or `org/name@revision`). Everything is then read by the same code.

Queries: only those with at least one relevant document (score > 0) are evaluated; `max_queries=N` keeps
the first N of them sorted by query id (string order), the LB reranker evaluation's 250-query cut.

Memory: the corpus is streamed, never held whole (dbpedia-entity has 4.6 M documents). BM25 keeps only
each document's length and its counts of the queries' words; the texts kept are the candidates' (plus,
for `candidates=all`, every document: meant for small sets). BM25's candidates and their texts are
cached per set (its files), split, query count, `top_n` and tokenisation under
`<cache dir>/candidates/`, so a second run does not read the corpus at all.
"""

from __future__ import annotations

import array
import csv
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loki.data.chat import resolve_path
from loki.errors import LokiError

_UKP = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
# Set name -> (where it is fetched from, pinned revision). Hub repos are pinned to the revision mteb's task
# definitions pin (embeddings-benchmark/mteb, mteb/tasks/retrieval/eng/*.py, `TaskMetadata.dataset`; the
# same pins as mteb 1.x's mteb/tasks/Retrieval/eng/*.py): ArguAna, DBPedia, FiQA2018, NFCorpus, SCIDOCS,
# SciFact, Touche2020. SciFact: mteb 1.x's pin (0228b52c), BEIR's own layout with the train qrels the
# per-validation metric reads; mteb 2.x moved to d56462d0, a re-upload whose splits were not checked here.
# trec-covid-v2 and vihealthqa are no mteb task and have no hub mirror we know of: BEIR's own zips, which
# have no revision (unpinned; the unpacked copy in the cache dir is reused once fetched).
BEIR_SETS: dict[str, tuple[str, str | None]] = {
    "arguana": ("mteb/arguana", "c22ab2a51041ffd869aaddef7af8d8215647e41a"),
    "dbpedia-entity": ("mteb/dbpedia", "c0f706b76e590d620bd6618b3ca8efdd34e2d659"),
    "fiqa": ("mteb/fiqa", "27a168819829fe9bcd655c2df245fb19452e8e06"),
    "nfcorpus": ("mteb/nfcorpus", "ec0fa4fe99da2ff19ca1214b7966684033a58814"),
    "scidocs": ("mteb/scidocs", "f8c2fcf00f625baaa80f62ec5bd9e1fff3b8ae88"),
    "scifact": ("mteb/scifact", "0228b52cf27578f30900b9e5271d331663a030d7"),
    "trec-covid-v2": (f"{_UKP}/trec-covid-v2.zip", None),
    "vihealthqa": (f"{_UKP}/vihealthqa.zip", None),
    "webis-touche2020": ("mteb/touche2020", "a34f9a33db75fa0cbb21bb5cfc3dae8dc8bec93f"),
}
# The sets the LB reranker was evaluated on (its model card's list).
LB_EVAL_SETS: tuple[str, ...] = tuple(BEIR_SETS)
CANDIDATE_MODES = ("bm25", "judged", "all")
# Files a hub snapshot needs in any of the layouts above.
_HUB_PATTERNS = [
    "corpus.jsonl*", "queries.jsonl*", "corpus.parquet", "queries.parquet", "corpus/*", "queries/*",
    "qrels/*", "default/*", "data/*", "*.tsv",
]


@dataclass
class BeirSet:
    # doc id -> {"title", "text"}: the documents the candidates need (every document for candidates=all)
    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]  # query id -> text; only queries with at least one relevant document
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: graded relevance}, documents of the corpus only
    origin: str = ""
    candidates: dict[str, list[str]] = field(default_factory=dict)  # query id -> doc ids to score
    name: str = ""


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _layout_error(root: Path, what: str) -> LokiError:
    return LokiError(
        f"BEIR set '{root}' has no {what} (needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv or .jsonl, "
        "or the parquet layout: corpus/*.parquet, queries/*.parquet, qrels|default|data/<split>-*.parquet)."
    )


def _first_file(root: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _table_files(root: Path, name: str) -> list[Path]:
    """The file(s) of `corpus` or `queries`: <name>.jsonl[.gz], else <name>.parquet or <name>/*.parquet."""
    found = _first_file(root, [f"{name}.jsonl"])
    if found:
        return [found]
    if (root / f"{name}.parquet").is_file():
        return [root / f"{name}.parquet"]
    shards = sorted((root / name).glob("*.parquet")) if (root / name).is_dir() else []
    if shards:
        return shards
    raise _layout_error(root, f"{name}.jsonl")


def _qrels_files(root: Path, split: str) -> list[Path]:
    found = _first_file(root, [f"qrels/{split}.tsv", f"qrels/{split}.jsonl", f"qrels/{split}.parquet"])
    if found:
        return [found]
    for folder in ("qrels", "default", "data"):
        shards = sorted((root / folder).glob(f"{split}-*.parquet")) if (root / folder).is_dir() else []
        if shards:
            return shards
    found = _first_file(root, [f"{split}.tsv"])
    if found:
        return [found]
    raise _layout_error(root, f"qrels/{split}.tsv")


def _is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def _iter_rows(files: list[Path], required: tuple[str, ...]) -> Iterator[dict]:
    """Rows of JSON-lines or parquet files, one at a time (parquet in record batches). `_id` may be
    spelled `id` (mteb's newer files)."""
    for path in files:
        if _is_parquet(path):
            rows = _iter_parquet(path)
        else:
            rows = _iter_jsonl(path)
        for where, row in rows:
            if "_id" in required and "_id" not in row and "id" in row:
                row["_id"] = row["id"]
            for column in required:
                if column not in row:
                    raise LokiError(f"BEIR file '{path}' {where} has no field '{column}'.")
            yield row


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with _open(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield f"line {line_no}", json.loads(line)


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LokiError(f"reading '{path}' needs pyarrow: pip install pyarrow") from None
    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_no += 1
            yield f"row {row_no}", row


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    return list(_iter_rows([path], required))


def read_qrels(path: Path | list[Path]) -> dict[str, dict[str, int]]:
    """query id -> {doc id: score} from BEIR qrels: TSV (first line skipped, as BEIR's loader does; tab or
    space separated), JSON lines or parquet (fields `query-id`, `corpus-id`, `score`)."""
    files = [path] if isinstance(path, Path) else list(path)
    qrels: dict[str, dict[str, int]] = {}
    for file in files:
        name = file.name.removesuffix(".gz")
        if name.endswith(".jsonl") or _is_parquet(file):
            for row in _iter_rows([file], ("query-id", "corpus-id", "score")):
                qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(float(row["score"]))
            continue
        with _open(file) as f:
            next(f, None)  # BEIR's GenericDataLoader skips the first line whatever it holds
            for line_no, line in enumerate(f, 2):
                fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
                if not any(x.strip() for x in fields):
                    continue
                if len(fields) < 3:
                    raise LokiError(
                        f"qrels file '{file}' line {line_no} has {len(fields)} field(s); expected query-id, corpus-id, score."
                    )
                try:
                    score = int(float(fields[2]))
                except ValueError:
                    raise LokiError(f"qrels file '{file}' line {line_no} has score {fields[2]!r}, not a number.") from None
                qrels.setdefault(fields[0].strip(), {})[fields[1].strip()] = score
    return qrels


def _download(source: str, revision: str | None = None) -> Path:
    if source.endswith(".zip"):
        return _download_zip(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, repo_type="dataset", revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # offline or unknown repo: both mean "point at local files"
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        at = f"@{revision}" if revision else ""
        raise LokiError(
            f"could not download BEIR set '{source}{at}' ({reason}); pass task.eval.path=/path/to/beir_dir "
            "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv), or task.eval.data_dir=DIR holding one such "
            "folder per set name, to read a local copy."
        ) from None


def _cache_dir() -> Path:
    """$LOKI_BEIR_CACHE, else <$LOKI_CACHE or ~/.cache/loki>/beir."""
    if os.environ.get("LOKI_BEIR_CACHE"):
        return Path(os.environ["LOKI_BEIR_CACHE"]).expanduser()
    return Path(os.environ.get("LOKI_CACHE") or Path.home() / ".cache" / "loki").expanduser() / "beir"


def _download_zip(url: str) -> Path:
    """A BEIR zip (one top folder named like the file), fetched and unpacked once under the cache dir."""
    name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zip")
    target = _cache_dir() / name
    if (target / "queries.jsonl").is_file() or (target / "queries.jsonl.gz").is_file():
        return target
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LokiError(
            f"BEIR set '{name}' is not cached at {target} and HF_HUB_OFFLINE=1; download {url}, unzip it and pass "
            "task.eval.data_dir=<the folder holding it>."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            archive = Path(tmp) / "set.zip"
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
            unpacked = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(unpacked), str(target))
    except (OSError, zipfile.BadZipFile) as err:
        raise LokiError(
            f"could not download BEIR set '{name}' from {url} ({err}); download and unzip it yourself and pass "
            "task.eval.data_dir=<the folder holding it>."
        ) from None
    return target


def _hub_name(name: str) -> tuple[str, str | None]:
    """'org/name@revision' -> ('org/name', 'revision'); no '@': the repo's main branch."""
    repo, _, revision = name.partition("@")
    return repo, (revision or None)


def resolve_set(name: str, data_dir: str | Path | None = None) -> tuple[Path, str, str]:
    """(directory, origin, display name) of one entry of `task.eval.sets`."""
    local = resolve_path(name)
    if local.is_dir():
        return local, str(local), local.name
    if data_dir:
        root = resolve_path(data_dir)
        candidate = root / name
        if candidate.is_dir():
            return candidate, str(candidate), name
        if name in BEIR_SETS or "/" not in name:
            raise LokiError(f"BEIR set '{name}' is not in task.eval.data_dir '{root}' (expected a folder {candidate}).")
    if name in BEIR_SETS:
        source, revision = BEIR_SETS[name]
        return _download(source, revision), source + (f"@{revision}" if revision else ""), name
    if "/" in name:
        repo, revision = _hub_name(name)
        return _download(repo, revision), name, repo.rsplit("/", 1)[-1]
    raise LokiError(
        f"unknown BEIR set '{name}': use a local directory, a hub repo 'org/name[@revision]', or one of {', '.join(BEIR_SETS)}."
    )


def load_beir(
    path: str | Path | None = None,
    source: str | None = None,
    split: str = "test",
    max_queries: int | None = None,
    candidates: str = "all",
    num_negatives: int = 0,
    top_n: int | None = None,
    seed: int = 0,
    name: str | None = None,
    data_dir: str | Path | None = None,
    cache: bool = True,
) -> BeirSet:
    """Read one BEIR set and choose, per query, the documents the reranker will score.

    The set: `path` (a local directory), else `name` (see `resolve_set`), else `source` (a hub repo,
    `org/name[@revision]`).
    `max_queries`: keep the first N judged queries sorted by id (null: all).
    `candidates`:
      - "bm25": the `top_n` best documents by BM25 (`bm25_scores`: bm25s' scoring and its lower-casing
        word tokeniser with English stopwords, no stemmer; title + text), documents matching no query word
        left out: the usual re-ranking setup. Relevant documents BM25 misses stay missing, so they count
        as misses in the metrics. Cached (see the module doc) unless `cache=False`;
      - "all": every corpus document (exact, for small corpora such as the test fixture);
      - "judged": the query's judged documents plus `num_negatives` random unjudged ones (seeded): fast,
        but NOT comparable with published numbers (every relevant document is a candidate);
      - a path to a run file (`query-id corpus-id score` TSV): its `top_n` best documents per query.
    A document whose id equals its query's id is never a candidate (BEIR's `ignore_identical_ids`).
    The corpus is streamed: `BeirSet.corpus` holds the candidates' documents only (all, for "all").
    """
    if path:
        root = resolve_path(path)
        if not root.is_dir():
            raise LokiError(f"BEIR set directory '{path}' does not exist.")
        origin, display = str(root), root.name
    elif name:
        root, origin, display = resolve_set(str(name), data_dir)
    elif source:
        repo, revision = _hub_name(str(source))
        root, origin, display = _download(repo, revision), str(source), repo.rsplit("/", 1)[-1]
    else:
        raise LokiError("the reranker evaluation needs task.eval.sets, task.eval.path (a BEIR directory) or task.eval.source.")
    corpus_files = _table_files(root, "corpus")
    all_queries = {str(r["_id"]): str(r["text"]) for r in _iter_rows(_table_files(root, "queries"), ("_id", "text"))}
    qrels_files = _qrels_files(root, split)
    qrels = read_qrels(qrels_files)
    query_ids = sorted(q for q in all_queries if q in qrels and any(s > 0 for s in qrels[q].values()))
    if max_queries is not None and 0 <= int(max_queries) < len(query_ids):
        query_ids = query_ids[: int(max_queries)]
    if not query_ids:
        raise LokiError(f"BEIR set '{origin}' split '{split}' has no query with a relevant document.")
    queries = {q: all_queries[q] for q in query_ids}
    judged = {d for q in query_ids for d in qrels[q]}
    mode = str(candidates)
    if mode == "bm25":
        k = int(top_n) if top_n else 100
        key = _candidates_key(corpus_files, queries, k, judged)
        cached = _read_cached_candidates(key) if cache else None
        if cached is None:
            cached = _stream_bm25(corpus_files, queries, k, judged)
            if cache:
                _write_cached_candidates(key, cached)
        found, docs, present = cached
    elif mode == "all":
        docs = {doc_id: doc for doc_id, doc in _iter_corpus(corpus_files)}
        found, present = {q: list(docs) for q in query_ids}, judged & docs.keys()
    elif mode == "judged":
        found, docs, present = _judged_candidates(corpus_files, qrels, query_ids, judged, int(num_negatives), seed)
    else:
        found, docs, present = _run_file_candidates(corpus_files, query_ids, judged, mode, top_n)
    qrels = {q: {d: s for d, s in qrels[q].items() if d in present} for q in query_ids}
    beir = BeirSet(corpus=docs, queries=queries, qrels=qrels, origin=origin, name=display)
    beir.candidates = {q: [d for d in found.get(q, []) if d != q] for q in query_ids}
    return beir


def _iter_corpus(files: list[Path]) -> Iterator[tuple[str, dict[str, str]]]:
    for r in _iter_rows(files, ("_id", "text")):
        yield str(r["_id"]), {"title": str(r.get("title") or ""), "text": str(r["text"])}


def _collect(files: list[Path], wanted: set[str]) -> dict[str, dict[str, str]]:
    """The documents of `wanted` ids, in one pass over the corpus."""
    return {doc_id: doc for doc_id, doc in _iter_corpus(files) if doc_id in wanted}


def _judged_candidates(files, qrels, query_ids, judged, num_negatives, seed):
    ids = [doc_id for doc_id, _ in _iter_corpus(files)]  # ids only: the negatives are drawn from all of them
    present = judged.intersection(ids)
    rng = random.Random(seed)
    found = {}
    for q in query_ids:
        own = [d for d in qrels[q] if d in present]
        taken = set(qrels[q])
        unjudged = [d for d in ids if d not in taken]
        found[q] = own + rng.sample(unjudged, min(num_negatives, len(unjudged)))
    return found, _collect(files, {d for docs in found.values() for d in docs}), present


def _run_file_candidates(files, query_ids, judged, candidates: str, top_n):
    run_file = resolve_path(candidates)
    if not run_file.is_file():
        raise LokiError(
            f"task.eval.candidates must be 'bm25', 'all', 'judged' or a run file; '{candidates}' does not exist."
        )
    wanted = set(query_ids)
    run: dict[str, list[tuple[float, str]]] = {}
    with _open(run_file) as f:
        for row in csv.reader(f, delimiter="\t"):
            if len(row) >= 3 and row[0] != "query-id" and row[0] in wanted:
                run.setdefault(row[0], []).append((float(row[2]), row[1]))
    docs = _collect(files, {d for hits in run.values() for _, d in hits} | judged)
    found = {}
    for q in query_ids:
        ranked = [d for _, d in sorted(run.get(q, []), key=lambda x: -x[0]) if d in docs]
        found[q] = ranked[: int(top_n)] if top_n else ranked
    keep = {d for ranked in found.values() for d in ranked}
    return found, {d: doc for d, doc in docs.items() if d in keep}, judged & docs.keys()


# ----------------------------------------------------------------------------------------------- BM25

# bm25s' defaults, which the candidates reproduce: Lucene's BM25 (k1, b), its tokeniser's word pattern.
BM25_K1, BM25_B = 1.5, 0.75
_TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")
# Bump when the tokenisation or the cached file changes: old cache entries are then ignored.
_CANDIDATES_FORMAT = 1


def _stopwords() -> frozenset[str]:
    try:
        from bm25s.stopwords import STOPWORDS_EN
    except ImportError:
        raise LokiError("task.eval.candidates=bm25 needs the bm25s package: pip install bm25s") from None
    return frozenset(STOPWORDS_EN)


def bm25_tokens(text: str, stopwords: frozenset[str]) -> list[str]:
    """bm25s.tokenize's words (lower-cased, 2+ word characters, English stopwords out, no stemmer)."""
    return [t for t in _TOKEN_PATTERN.findall(text.lower()) if t not in stopwords]


class _QueryWordIndex:
    """BM25 statistics of a streamed corpus, restricted to the words of a fixed set of queries: each
    document's length and, per query word, the documents holding it with their score contribution."""

    def __init__(self, texts: Iterable[str], queries: list[str]):
        import numpy as np

        stop = _stopwords()
        self.query_tokens = [bm25_tokens(q, stop) for q in queries]
        vocab: dict[str, int] = {}
        for tokens in self.query_tokens:
            for t in tokens:
                vocab.setdefault(t, len(vocab))
        self.vocab = vocab
        # int32 columns grown in place: 12 bytes per (document, query word) pair, 4 per document.
        lengths, hit_doc, hit_term, hit_tf = (array.array("i") for _ in range(4))
        for i, text in enumerate(texts):
            tokens = bm25_tokens(text, stop)
            lengths.append(len(tokens))
            for term, tf in Counter(t for t in tokens if t in vocab).items():
                hit_doc.append(i)
                hit_term.append(vocab[term])
                hit_tf.append(tf)
        self.n_docs = len(lengths)
        length = np.frombuffer(lengths, dtype=np.int32) if lengths else np.zeros(0, dtype=np.int32)
        docs = np.frombuffer(hit_doc, dtype=np.int32) if hit_doc else np.zeros(0, dtype=np.int32)
        terms = np.frombuffer(hit_term, dtype=np.int32) if hit_term else np.zeros(0, dtype=np.int32)
        tfs = np.frombuffer(hit_tf, dtype=np.int32) if hit_tf else np.zeros(0, dtype=np.int32)
        avg_len = length.astype(np.int64).mean() if self.n_docs else 1.0  # float64, as bm25s computes it
        df = np.bincount(terms, minlength=len(vocab))
        n = self.n_docs
        idf = np.array([math.log(1 + (n - f + 0.5) / (f + 0.5)) if f else 0.0 for f in df], dtype=np.float32)
        # bm25s: tf / (k1 * ((1 - b) + b * l_d / l_avg) + tf) in float64, times the float32 idf, stored as
        # float32. In chunks, so the float64 temporaries stay small.
        contribution = np.empty(len(docs), dtype=np.float32)
        for lo in range(0, len(docs), 1 << 20):
            d, t = docs[lo : lo + (1 << 20)], terms[lo : lo + (1 << 20)]
            tf = tfs[lo : lo + (1 << 20)].astype(np.float32)
            norm = BM25_K1 * ((1 - BM25_B) + BM25_B * length[d].astype(np.float64) / avg_len)
            contribution[lo : lo + len(d)] = idf[t] * (tf / (norm + tf))
        order = np.argsort(terms, kind="stable")
        self.docs, self.contribution = docs[order], contribution[order]
        self.starts = np.searchsorted(terms[order], np.arange(len(vocab) + 1))

    def scores(self, query: int, out=None):
        """float32 BM25 of every document for query number `query`: its words' contributions summed in
        float32 in the query's word order (a repeated word counts twice), as bm25s sums them."""
        import numpy as np

        scores = np.zeros(self.n_docs, dtype=np.float32) if out is None else out
        scores[:] = 0
        for t in self.query_tokens[query]:
            lo, hi = self.starts[self.vocab[t]], self.starts[self.vocab[t] + 1]
            np.add.at(scores, self.docs[lo:hi], self.contribution[lo:hi])
        return scores


def bm25_scores(texts: Iterable[str], queries: list[str]) -> list:
    """BM25 (Lucene's variant, k1 = 1.5, b = 0.75) of every document for every query, a float32 array per
    query: bm25s' numbers to the bit (NumPy 2) for the same texts. For small corpora and tests; the
    candidates use `bm25_top`, which keeps one score array at a time."""
    index = _QueryWordIndex(texts, queries)
    return [index.scores(q) for q in range(len(queries))]


def bm25_top(texts: Iterable[str], queries: list[str], top_n: int) -> list[list[int]]:
    """Per query, the indices (in `texts`' order) of the `top_n` best documents by BM25, score > 0,
    best first, equal scores in corpus order. `texts` is read once."""
    index = _QueryWordIndex(texts, queries)
    buffer = None
    out = []
    for q in range(len(queries)):
        buffer = index.scores(q, buffer)
        out.append(top_documents(buffer, int(top_n)))
    return out


def top_documents(scores, top_n: int) -> list[int]:
    """Indices of the `top_n` highest scores > 0, best first; equal scores: lower index first."""
    import numpy as np

    hits = np.flatnonzero(scores > 0)
    if len(hits) > top_n:
        threshold = np.partition(scores[hits], len(hits) - top_n)[len(hits) - top_n]
        hits = hits[scores[hits] >= threshold]
    ranked = hits[np.lexsort((hits, -scores[hits]))]
    return [int(i) for i in ranked[:top_n]]


def bm25_candidates(beir: BeirSet, top_n: int = 100) -> dict[str, list[str]]:
    """Per query, the ids of the `top_n` documents of `beir.corpus` with the highest BM25 score (> 0),
    best first (equal scores: corpus order), before the identical-id filter."""
    doc_ids = list(beir.corpus)
    query_ids = list(beir.queries)
    texts = (f"{d['title']} {d['text']}".strip() for d in beir.corpus.values())
    top = bm25_top(texts, [beir.queries[q] for q in query_ids], int(top_n))
    return {q: [doc_ids[i] for i in rows] for q, rows in zip(query_ids, top)}


def _stream_bm25(files: list[Path], queries: dict[str, str], top_n: int, judged: set[str]):
    """(candidates, their documents, judged ids in the corpus) with two streaming passes: BM25 on the
    texts, then the winners' ids and texts."""
    present: set[str] = set()

    def texts() -> Iterator[str]:
        for doc_id, doc in _iter_corpus(files):
            if doc_id in judged:
                present.add(doc_id)
            yield f"{doc['title']} {doc['text']}".strip()

    query_ids = list(queries)
    ranked = dict(zip(query_ids, bm25_top(texts(), [queries[q] for q in query_ids], top_n)))
    wanted = {i for rows in ranked.values() for i in rows}
    ids: dict[int, str] = {}
    docs: dict[str, dict[str, str]] = {}
    for i, (doc_id, doc) in enumerate(_iter_corpus(files)):
        if i in wanted:
            ids[i] = doc_id
            docs[doc_id] = doc
    return {q: [ids[i] for i in rows] for q, rows in ranked.items()}, docs, present


def _candidates_key(files: list[Path], queries: dict[str, str], top_n: int, judged: set[str]) -> str:
    """What the cached entry depends on: the corpus files (path, size, modification time; a hub file
    resolves to its content-addressed blob), the queries (split and count), top_n, the tokenisation, and
    the judged documents (the entry also records which of them the corpus holds)."""
    try:
        import bm25s

        version = getattr(bm25s, "__version__", "?")
    except ImportError:
        version = "missing"
    parts = {
        "format": _CANDIDATES_FORMAT,
        "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "queries": hashlib.sha256(json.dumps(queries, sort_keys=True).encode()).hexdigest(),
        "top_n": int(top_n),
        "judged": hashlib.sha256("\n".join(sorted(judged)).encode()).hexdigest(),
        "tokeniser": [_TOKEN_PATTERN.pattern, "lower", "stopwords=bm25s.en", "no stemmer", BM25_K1, BM25_B, version],
    }
    from loki.files import settings_digest

    return settings_digest(parts, 24)


def _cached_path(key: str) -> Path:
    return _cache_dir() / "candidates" / f"{key}.json.gz"


def _read_cached_candidates(key: str):
    path = _cached_path(key)
    if not path.is_file():
        return None
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        return data["candidates"], data["docs"], set(data["judged_in_corpus"])
    except (OSError, ValueError, KeyError):  # a damaged entry is recomputed
        return None


def _write_cached_candidates(key: str, value) -> None:
    found, docs, present = value
    path = _cached_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                json.dump({"candidates": found, "docs": docs, "judged_in_corpus": sorted(present)}, f)
        os.replace(tmp.name, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:  # a read-only cache only costs the next run the BM25 pass
        pass
