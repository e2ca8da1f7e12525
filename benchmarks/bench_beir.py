"""BEIR BM25 candidates at scale: peak memory and time, the old whole-corpus loader vs the streaming one.

    python benchmarks/bench_beir.py [--docs 50000] [--queries 250] [--top-n 100]

Writes a synthetic BEIR set shaped like dbpedia-entity (a short title and ~50 words of text per document,
BEIR's figure for dbpedia is 49.7 words; words drawn from a Zipf law over 200k words; queries of 2-6 words
from the same law minus its 50 most frequent words, which stand in for the stopwords the tokeniser drops)
into a temporary directory. Each measurement runs `load_beir(candidates="bm25")` in a fresh subprocess and
reads its peak resident memory (ru_maxrss) and tracemalloc's peak (Python and NumPy allocations):

- old: the loader before streaming (`git show HEAD~:loki/data/beir.py` style copy taken from git, if
  `--old-ref` names a revision that has it): corpus as a list, a dict and a text list, bm25s index;
- new, cold: one streaming BM25 pass and one pass for the winners' texts, then the cache is written;
- new, warm: the cached candidates (no corpus read);
- imports only: the floor under all of them.

Per-document costs of the new loader: 4 bytes (length) + ~36 bytes per (document, query word) pair at the
peak (the int32 columns, the float32 scores, the sort order); the report prints the measured pairs per
document so the figure can be scaled to 4.6 M documents.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_set(root: Path, docs: int, queries: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(200_000)]
    cum = list(itertools.accumulate(1 / (r + 1) ** 1.07 for r in range(len(vocab))))

    def words(k: int, low: int = 0) -> list[str]:
        out = []
        while len(out) < k:
            i = bisect.bisect_left(cum, rng.random() * cum[-1])
            if i >= low:
                out.append(vocab[i])
        return out

    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(docs):
            row = {"_id": f"<dbpedia:Doc_{i}>", "title": " ".join(words(2)), "text": " ".join(words(rng.randint(30, 70)))}
            f.write(json.dumps(row) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for q in range(queries):
            f.write(json.dumps({"_id": f"q{q:04d}", "text": " ".join(words(rng.randint(2, 6), low=50))}) + "\n")
    with open(root / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in range(queries):
            f.write(f"q{q:04d}\t<dbpedia:Doc_{rng.randrange(docs)}>\t1\n")


def measure(mode: str, root: Path, top_n: int, old_file: str | None) -> dict:
    import tracemalloc

    sys.path.insert(0, str(REPO))
    import bm25s  # noqa: F401  imports count in the floor, not in the measurement
    import numpy  # noqa: F401

    if mode == "old":
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_beir", old_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_beir"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        load = lambda: module.load_beir(path=root, candidates="bm25", top_n=top_n)  # noqa: E731
    else:
        from loki.data import beir

        load = lambda: beir.load_beir(path=root, candidates="bm25", top_n=top_n)  # noqa: E731
    out = {"mode": mode}
    if mode != "imports":
        tracemalloc.start()
        t0 = time.perf_counter()
        result = load()
        out["seconds"] = time.perf_counter() - t0
        out["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        out["docs_kept"] = len(result.corpus)
        out["candidates"] = sum(len(c) for c in result.candidates.values())
        if mode == "new-cold":
            from loki.data.beir import _QueryWordIndex, _iter_corpus

            index = _QueryWordIndex((f"{d['title']} {d['text']}" for _, d in _iter_corpus([root / "corpus.jsonl"])), list(result.queries.values()))
            out["pairs_per_doc"] = len(index.docs) / max(1, index.n_docs)
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=250)
    parser.add_argument("--top-n", type=int, default=100)
    parser.add_argument("--old-ref", default="HEAD", help="git revision holding the whole-corpus loader ('' to skip)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--old-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.root), args.top_n, args.old_file)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "set"
        t0 = time.perf_counter()
        write_set(root, args.docs, args.queries)
        size = (root / "corpus.jsonl").stat().st_size / 2**20
        print(f"synthetic set: {args.docs} docs, {size:.1f} MB corpus.jsonl, {args.queries} queries ({time.perf_counter() - t0:.0f} s)")
        old_file = None
        if args.old_ref:
            old_file = str(Path(tmp) / "old_beir.py")
            text = subprocess.run(["git", "show", f"{args.old_ref}:loki/data/beir.py"], cwd=REPO, capture_output=True, text=True)
            if text.returncode == 0 and "snapshot_download" in text.stdout and "_QueryWordIndex" not in text.stdout:
                Path(old_file).write_text(text.stdout)
            else:
                old_file = None
        env = {**os.environ, "LOKI_BEIR_CACHE": str(Path(tmp) / "cache"), "OMP_NUM_THREADS": "1"}
        modes = ["imports"] + (["old"] if old_file else []) + ["new-cold", "new-warm"]
        rows = []
        for mode in modes:
            cmd = [sys.executable, __file__, "--measure", mode, "--root", str(root), "--top-n", str(args.top_n)]
            if old_file:
                cmd += ["--old-file", old_file]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        floor = rows[0]["max_rss_mb"]
        print("| run | wall (s) | peak RSS (MB) | RSS above imports (MB) | tracemalloc peak (MB) | documents kept |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            if row["mode"] == "imports":
                print(f"| imports only | - | {row['max_rss_mb']:.0f} | 0 | - | - |")
                continue
            print(
                f"| {row['mode']} | {row['seconds']:.1f} | {row['max_rss_mb']:.0f} | {row['max_rss_mb'] - floor:.0f} | "
                f"{row['traced_peak_mb']:.0f} | {row['docs_kept']} |"
            )
        cold = next(r for r in rows if r["mode"] == "new-cold")
        print(f"(document, query word) pairs per document: {cold['pairs_per_doc']:.2f}")


if __name__ == "__main__":
    main()
