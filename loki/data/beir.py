"""BEIR-format retrieval sets: `corpus.jsonl` {_id, title, text}, `queries.jsonl` {_id, text},
`qrels/<split>.tsv` (header `query-id corpus-id score`).

`path` is a local directory in that layout; `source` is a hub dataset repo in the same layout (e.g.
`mteb/scifact`), fetched with `huggingface_hub.snapshot_download` and then read by the same code.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from loki.data.chat import resolve_path
from loki.errors import LokiError


@dataclass
class BeirSet:
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}
    queries: dict[str, str]  # query id -> text; only queries with at least one judged document
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: graded relevance}
    origin: str = ""
    candidates: dict[str, list[str]] = field(default_factory=dict)  # query id -> doc ids to score


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise LokiError(f"BEIR set '{root}' has no {name} (needs corpus.jsonl, queries.jsonl, qrels/<split>.tsv).")


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
    qrels: dict[str, dict[str, int]] = {}
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
            "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv) to read a local copy."
        ) from None


def load_beir(
    path: str | Path | None = None,
    source: str | None = None,
    split: str = "test",
    max_queries: int | None = None,
    candidates: str = "all",
    num_negatives: int = 0,
    top_n: int | None = None,
    seed: int = 0,
) -> BeirSet:
    """Read a BEIR set and choose, per query, the documents the reranker will score.

    `candidates`:
      - "all": every corpus document (exact, for small corpora such as the test fixture);
      - "judged": the query's judged documents plus `num_negatives` random unjudged ones (seeded);
      - a path to a run file (`query-id corpus-id score` TSV, e.g. BM25 output): its `top_n` best
        documents per query, the usual re-ranking setup. Relevant documents the run misses stay missing,
        so they count as misses in the metrics.
    """
    if path:
        root = resolve_path(path)
        if not root.is_dir():
            raise LokiError(f"BEIR set directory '{path}' does not exist.")
        origin = str(root)
    elif source:
        root, origin = _download(source), source
    else:
        raise LokiError("the reranker evaluation needs task.eval.path (a BEIR directory) or task.eval.source.")
    corpus = {
        str(r["_id"]): {"title": str(r.get("title") or ""), "text": str(r["text"])}
        for r in _read_jsonl(_find(root, "corpus.jsonl"), ("_id", "text"))
    }
    all_queries = {str(r["_id"]): str(r["text"]) for r in _read_jsonl(_find(root, "queries.jsonl"), ("_id", "text"))}
    qrels = read_qrels(_find(root, f"qrels/{split}.tsv"))
    query_ids = [q for q in all_queries if q in qrels and any(s > 0 for s in qrels[q].values())]
    if max_queries is not None and 0 <= int(max_queries) < len(query_ids):
        query_ids = sorted(random.Random(seed).sample(query_ids, int(max_queries)), key=query_ids.index)
    if not query_ids:
        raise LokiError(f"BEIR set '{origin}' split '{split}' has no query with a relevant document.")
    queries = {q: all_queries[q] for q in query_ids}
    qrels = {q: {d: s for d, s in qrels[q].items() if d in corpus} for q in query_ids}
    beir = BeirSet(corpus=corpus, queries=queries, qrels=qrels, origin=origin)
    beir.candidates = choose_candidates(beir, candidates, num_negatives, top_n, seed)
    return beir


def choose_candidates(beir: BeirSet, candidates: str, num_negatives: int, top_n: int | None, seed: int) -> dict[str, list[str]]:
    doc_ids = list(beir.corpus)
    if candidates == "all":
        return {q: list(doc_ids) for q in beir.queries}
    if candidates == "judged":
        rng = random.Random(seed)
        out = {}
        for q in beir.queries:
            judged = list(beir.qrels[q])
            unjudged = [d for d in doc_ids if d not in beir.qrels[q]]
            out[q] = judged + rng.sample(unjudged, min(int(num_negatives), len(unjudged)))
        return out
    run_file = resolve_path(candidates)
    if not run_file.is_file():
        raise LokiError(f"task.eval.candidates must be 'all', 'judged' or a run file; '{candidates}' does not exist.")
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
