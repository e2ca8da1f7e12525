"""BEIR-format retrieval sets and the candidates a reranker scores.

Layout (a local directory, a hub dataset repo, or an unpacked BEIR zip): `corpus.jsonl` {_id, title, text},
`queries.jsonl` {_id, text}, `qrels/<split>.tsv` (header `query-id corpus-id score`) or
`qrels/<split>.jsonl` (fields `query-id`, `corpus-id`, `score`); any of them may be gzipped.

Where a set comes from (`resolve_set`): a local directory; else `<data_dir>/<name>` when a data_dir is
given; else `BEIR_SETS[name]` (a hub repo, fetched with `huggingface_hub.snapshot_download`, or a BEIR
zip URL, fetched once into `~/.cache/loki/beir`); else the name itself as a hub repo (`org/name`).
Everything is then read by the same code.

The LB reranker's own evaluation list, name -> where it is fetched from:

    arguana           mteb/arguana
    dbpedia-entity    mteb/dbpedia
    fiqa              mteb/fiqa
    nfcorpus          mteb/nfcorpus
    scidocs           mteb/scidocs
    scifact           mteb/scifact
    trec-covid-v2     BEIR zip (public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/trec-covid-v2.zip)
    vihealthqa        BEIR zip (public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/vihealthqa.zip)
    webis-touche2020  mteb/touche2020

(trec-covid-v2 and vihealthqa have no hub mirror we know of: BEIR's own download server holds them.)

Queries: only those with at least one relevant document (score > 0) are evaluated; `max_queries=N` keeps
the first N of them sorted by query id (string order), the LB reranker evaluation's 250-query cut.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from loki.data.chat import resolve_path
from loki.errors import LokiError

_UKP = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
# Set name -> hub dataset repo in BEIR layout, or a BEIR zip URL (unpacks to <name>/corpus.jsonl, ...).
BEIR_SETS: dict[str, str] = {
    "arguana": "mteb/arguana",
    "dbpedia-entity": "mteb/dbpedia",
    "fiqa": "mteb/fiqa",
    "nfcorpus": "mteb/nfcorpus",
    "scidocs": "mteb/scidocs",
    "scifact": "mteb/scifact",
    "trec-covid-v2": f"{_UKP}/trec-covid-v2.zip",
    "vihealthqa": f"{_UKP}/vihealthqa.zip",
    "webis-touche2020": "mteb/touche2020",
}
# The sets the LB reranker was evaluated on (its model card's list).
LB_EVAL_SETS: tuple[str, ...] = tuple(BEIR_SETS)
CANDIDATE_MODES = ("bm25", "judged", "all")


@dataclass
class BeirSet:
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}
    queries: dict[str, str]  # query id -> text; only queries with at least one relevant document
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: graded relevance}
    origin: str = ""
    candidates: dict[str, list[str]] = field(default_factory=dict)  # query id -> doc ids to score
    name: str = ""


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _find(root: Path, *names: str) -> Path:
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise LokiError(
        f"BEIR set '{root}' has no {' or '.join(names)} (needs corpus.jsonl, queries.jsonl, qrels/<split>.tsv or .jsonl)."
    )


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    with _open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for column in required:
                if column not in row:
                    raise LokiError(f"BEIR file '{path}' line {line_no} has no field '{column}'.")
            rows.append(row)
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id -> {doc id: score} from a BEIR qrels file: TSV with a header, or JSON lines."""
    qrels: dict[str, dict[str, int]] = {}
    if path.name.removesuffix(".gz").endswith(".jsonl"):
        for row in _read_jsonl(path, ("query-id", "corpus-id", "score")):
            qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(float(row["score"]))
        return qrels
    with _open(path) as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise LokiError(f"qrels file '{path}' must start with the header 'query-id<TAB>corpus-id<TAB>score'.")
        for row in reader:
            if len(row) >= 3:
                qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    return qrels


def _download(source: str) -> Path:
    if source.endswith(".zip"):
        return _download_zip(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                source, repo_type="dataset", allow_patterns=["corpus.jsonl*", "queries.jsonl*", "qrels/*"]
            )
        )
    except Exception as err:  # offline or unknown repo: both mean "point at local files"
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise LokiError(
            f"could not download BEIR set '{source}' ({reason}); pass task.eval.path=/path/to/beir_dir "
            "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv), or task.eval.data_dir=DIR holding one such "
            "folder per set name, to read a local copy."
        ) from None


def _cache_dir() -> Path:
    return Path(os.environ.get("LOKI_BEIR_CACHE") or Path.home() / ".cache" / "loki" / "beir")


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
        return _download(BEIR_SETS[name]), BEIR_SETS[name], name
    if "/" in name:
        return _download(name), name, name.rsplit("/", 1)[-1]
    raise LokiError(
        f"unknown BEIR set '{name}': use a local directory, a hub repo 'org/name', or one of {', '.join(BEIR_SETS)}."
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
) -> BeirSet:
    """Read one BEIR set and choose, per query, the documents the reranker will score.

    The set: `path` (a local directory), else `name` (see `resolve_set`), else `source` (a hub repo).
    `max_queries`: keep the first N judged queries sorted by id (null: all).
    `candidates`:
      - "bm25": the `top_n` best documents by BM25 (the `bm25s` package, its built-in lower-casing word
        tokeniser with English stopwords, no stemmer; title + text), documents matching no query word
        left out: the usual re-ranking setup. Relevant documents BM25 misses stay missing, so they count
        as misses in the metrics;
      - "all": every corpus document (exact, for small corpora such as the test fixture);
      - "judged": the query's judged documents plus `num_negatives` random unjudged ones (seeded): fast,
        but NOT comparable with published numbers (every relevant document is a candidate);
      - a path to a run file (`query-id corpus-id score` TSV): its `top_n` best documents per query.
    A document whose id equals its query's id is never a candidate (BEIR's `ignore_identical_ids`).
    """
    if path:
        root = resolve_path(path)
        if not root.is_dir():
            raise LokiError(f"BEIR set directory '{path}' does not exist.")
        origin, display = str(root), root.name
    elif name:
        root, origin, display = resolve_set(str(name), data_dir)
    elif source:
        root, origin, display = _download(source), source, source.rsplit("/", 1)[-1]
    else:
        raise LokiError("the reranker evaluation needs task.eval.sets, task.eval.path (a BEIR directory) or task.eval.source.")
    corpus = {
        str(r["_id"]): {"title": str(r.get("title") or ""), "text": str(r["text"])}
        for r in _read_jsonl(_find(root, "corpus.jsonl"), ("_id", "text"))
    }
    all_queries = {str(r["_id"]): str(r["text"]) for r in _read_jsonl(_find(root, "queries.jsonl"), ("_id", "text"))}
    qrels = read_qrels(_find(root, f"qrels/{split}.tsv", f"qrels/{split}.jsonl"))
    query_ids = sorted(q for q in all_queries if q in qrels and any(s > 0 for s in qrels[q].values()))
    if max_queries is not None and 0 <= int(max_queries) < len(query_ids):
        query_ids = query_ids[: int(max_queries)]
    if not query_ids:
        raise LokiError(f"BEIR set '{origin}' split '{split}' has no query with a relevant document.")
    queries = {q: all_queries[q] for q in query_ids}
    qrels = {q: {d: s for d, s in qrels[q].items() if d in corpus} for q in query_ids}
    beir = BeirSet(corpus=corpus, queries=queries, qrels=qrels, origin=origin, name=display)
    beir.candidates = choose_candidates(beir, candidates, num_negatives, top_n, seed)
    return beir


def choose_candidates(
    beir: BeirSet, candidates: str, num_negatives: int, top_n: int | None, seed: int
) -> dict[str, list[str]]:
    doc_ids = list(beir.corpus)
    if candidates == "bm25":
        out = bm25_candidates(beir, int(top_n) if top_n else 100)
    elif candidates == "all":
        out = {q: list(doc_ids) for q in beir.queries}
    elif candidates == "judged":
        rng = random.Random(seed)
        out = {}
        for q in beir.queries:
            judged = list(beir.qrels[q])
            unjudged = [d for d in doc_ids if d not in beir.qrels[q]]
            out[q] = judged + rng.sample(unjudged, min(int(num_negatives), len(unjudged)))
    else:
        out = _run_file_candidates(beir, candidates, top_n)
    return {q: [d for d in docs if d != q] for q, docs in out.items()}


def bm25_candidates(beir: BeirSet, top_n: int = 100) -> dict[str, list[str]]:
    """Per query, the ids of the `top_n` documents with the highest BM25 score (> 0), best first
    (equal scores: corpus order). bm25s defaults: k1 = 1.5, b = 0.75, Lucene's idf."""
    try:
        import bm25s
    except ImportError:
        raise LokiError("task.eval.candidates=bm25 needs the bm25s package: pip install bm25s") from None
    doc_ids = list(beir.corpus)
    texts = [f"{d['title']} {d['text']}".strip() for d in beir.corpus.values()]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    query_ids = list(beir.queries)
    tokens = bm25s.tokenize([beir.queries[q] for q in query_ids], stopwords="en", show_progress=False, return_ids=False)
    k = min(int(top_n), len(doc_ids))
    found, scores = retriever.retrieve(tokens, k=k, show_progress=False)
    out = {}
    for row, q in enumerate(query_ids):
        hits = sorted((-float(s), int(i)) for i, s in zip(found[row].tolist(), scores[row].tolist()) if s > 0)
        out[q] = [doc_ids[i] for _, i in hits]
    return out


def _run_file_candidates(beir: BeirSet, candidates: str, top_n: int | None) -> dict[str, list[str]]:
    run_file = resolve_path(candidates)
    if not run_file.is_file():
        raise LokiError(
            f"task.eval.candidates must be 'bm25', 'all', 'judged' or a run file; '{candidates}' does not exist."
        )
    run: dict[str, list[tuple[float, str]]] = {}
    with _open(run_file) as f:
        for row in csv.reader(f, delimiter="\t"):
            if len(row) >= 3 and row[0] != "query-id":
                run.setdefault(row[0], []).append((float(row[2]), row[1]))
    out = {}
    for q in beir.queries:
        ranked = [d for _, d in sorted(run.get(q, []), key=lambda x: -x[0]) if d in beir.corpus]
        out[q] = ranked[: int(top_n)] if top_n else ranked
    return out
