"""Positions that ship with the package, in `loki/published/<model name>/<q in percent>.json`.

Two kinds live there:
- the LoKI authors' published files (Qwen2.5-0.5B-Instruct, Llama-3.1-8B-Instruct), read with
  `loki.positions=published`;
- this project's own, made from a full attribution store by `python -m loki.shipped` (SmolLM2-135M-Instruct),
  with a `provenance.json` that records the store's identity (model name, config hash, weights fingerprint,
  prompt format, KVA and prompt settings: `loki.store.store_meta`) and the selection (strategy, score).

A run with `loki.scores=auto` that finds no attribution store uses the shipped file instead of analysing
first when its provenance equals what this run's store would record and its selection settings are the
run's (`loki.use_shipped`, on by default): the same positions, without the attribution's hour on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from loki.errors import LokiError

PUBLISHED_DIR = Path(__file__).parent / "published"
PROVENANCE_FILE = "provenance.json"
PROVENANCE_FORMAT = "loki-shipped-positions-v1"


def _percent(q: float) -> str:
    return f"{round(q * 100, 6):g}"


def published_positions_path(model_name: str, q: float, root: Path | None = None) -> Path:
    """The shipped file for this model and q (q in 5/10/20/30 % for the shipped models)."""
    root = PUBLISHED_DIR if root is None else root
    folder = root / model_name
    path = folder / f"{_percent(q)}.json"
    if not path.exists():
        available = sorted(p.stem for p in folder.glob("*.json") if p.name != PROVENANCE_FILE) if folder.exists() else []
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise LokiError(
            f"no published positions for model '{model_name}' at q={q:g} "
            + (f"(published q in %: {', '.join(available)})" if available else f"(published for: {', '.join(have)})")
            + "; run the attribution stage and use loki.scores instead."
        )
    return path


def provenance(model_name: str, root: Path | None = None) -> dict | None:
    """The shipped provenance of a model's positions (None for the authors' files, which have none)."""
    path = (PUBLISHED_DIR if root is None else root) / model_name / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_for(model_name: str, q: float, wanted_meta: dict, strategy: str, score: str, root: Path | None = None) -> tuple[Path | None, str]:
    """(the shipped positions file, "") when one was made from exactly the store this run would make
    (`wanted_meta`, from `loki.store.store_meta`) with this selection and q; else (None, why not)."""
    from loki.store import _json_ready, first_difference

    record = provenance(model_name, root)
    if record is None:
        return None, f"no shipped positions with a provenance for '{model_name}'"
    diff = first_difference(_json_ready(record["store_meta"]), _json_ready(wanted_meta))
    if diff:
        key, there, here = diff
        return None, f"the shipped positions were made with {key}={there!r}, this run has {here!r}"
    selection = record["selection"]
    if (selection["strategy"], selection["score"]) != (strategy, score):
        return None, f"the shipped positions were selected by {selection['strategy']} (score={selection['score']})"
    path = (PUBLISHED_DIR if root is None else root) / model_name / f"{_percent(q)}.json"
    if not path.is_file():
        return None, f"no shipped positions at q={q:g} (shipped q in %: {', '.join(map(str, record['q_percent']))})"
    return path, ""


def make_shipped(store_dir: str | Path, qs: list[float], strategy: str = "layer_balanced", score: str = "abs", root: Path | None = None) -> list[Path]:
    """Select positions from a finished attribution store at each q and write them, with `provenance.json`,
    to `<root>/<model name>/`. Returns the files written."""
    from loki.positions import save_positions
    from loki.select import select_positions
    from loki.store import ScoreStore

    if not ScoreStore.exists(store_dir):
        raise LokiError(f"{store_dir} is not a finished attribution store; finish it with attribute.py first.")
    store = ScoreStore(store_dir)
    meta = store.meta
    folder = (PUBLISHED_DIR if root is None else root) / meta["model"]["name"]
    written, digests = [], {}
    for q in sorted(qs):
        positions = select_positions(store.iter_chunks(), q, strategy=strategy, score=score)
        path = save_positions(positions, folder / f"{_percent(q)}.json")
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        written.append(path)
    record: dict[str, Any] = {
        "format": PROVENANCE_FORMAT,
        "store_meta": meta,
        "selection": {"strategy": strategy, "score": score},
        "num_prompts": store.num_samples,
        "q_percent": [float(_percent(q)) if "." in _percent(q) else int(_percent(q)) for q in sorted(qs)],
        "sha256": digests,
        "made_by": "python -m loki.shipped --store <the store> --q " + " ".join(f"{q:g}" for q in sorted(qs))
        + f" --strategy {strategy} --score {score}",
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return written + [folder / PROVENANCE_FILE]


def main(argv: list[str] | None = None) -> int:
    from loki.select import SCORE_MODES, SCORE_STRATEGIES

    parser = argparse.ArgumentParser(
        prog="python -m loki.shipped",
        description="A finished attribution store -> the positions shipped in loki/published/<model name>/, with their provenance.",
    )
    parser.add_argument("--store", required=True, help="a finished attribution store (attribute.py's out_dir)")
    parser.add_argument("--q", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3], help="fractions of rows per layer")
    parser.add_argument("--strategy", default="layer_balanced", choices=SCORE_STRATEGIES)
    parser.add_argument("--score", default="abs", choices=SCORE_MODES)
    parser.add_argument("--root", default=None, help="where to write (default: the package's loki/published/)")
    args = parser.parse_args(argv)
    try:
        paths = make_shipped(args.store, args.q, args.strategy, args.score, Path(args.root) if args.root else None)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
