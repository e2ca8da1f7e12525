"""The frontier's statistics: each method's Pareto front, its least forgetting at a task level, task
levels every method reaches, and bootstrap intervals over items and seeds (plain python + numpy).

Points (rows of points.jsonl, studies.frontier.run) are dicts with at least
    {"id": str, "method": str, "lr": float, "seed": int, "alpha": float, "task": float,
     "task_graded": float | None, "forgetting": {"kl": float, "lm_loss_delta": float, "avg": float | None}}
`alpha` 1.0 is a trained run, 0 < alpha < 1 an interpolation point of that run (it belongs to the run's
method and seed). The point with method "base" (id "base", the untrained model) is the reference: it is
left out of every method's front and table (`BASE`). A value that is None (not measured) leaves the point
out of that axis.

Task axes (`task_key`): "task" is the task's primary metric, which the bootstrap recomputes from the
test items as sum(weight * value) / sum(weight): the accuracy, mean(correct), for a question task, and
the mean over queries of the query's metric for a ranking task; "task_graded" is the mean log-probability
of the gold answer, mean(logprob), where the task has one. Forgetting measures: "kl" is the mean over the `kl` benchmarks of the mean
per-prompt KL; "lm_loss_delta" the mean over the `lm_loss` benchmarks of
sum(nll_after)/sum(tokens) - sum(nll_base)/sum(tokens_base); "avg" the paper's Avg over held-out
accuracies, 100 * mean over benchmarks of (acc_base - acc) / acc_base, recomputed from the letter/cloze
rows' correctness where every point and the base have them, else taken as recorded.

File layout (what the runner writes under its output dir, read back by `load_items`):

    points.jsonl          one point per line (above)
    items/<id>.json       {"task": [{"id", "correct", "logprob"}, ...],      the test items, in one order
                                  or [{"id", "value", "weight"}, ...],       (a question task, or a ranking task's queries)
                           "retention": {"<benchmark>": [row, ...], ...}}    run_retention(..., items=...)
    items/base.json       the same for the base model (its lm_loss rows are the lm_loss_delta reference)

Retention rows: {"kl": float} per prompt (a `kl` benchmark), {"nll": float, "tokens": int} per text (an
`lm_loss` benchmark), {"id", "correct", "logprob"} per row (a letter or cloze benchmark: its accuracy, read by
"avg"). Every file lists
the same items in the same order; `items_from_rows` refuses files that disagree.

In memory (`FrontierItems`): numpy arrays per point id, `PointItems(value [n_task], logprob [n_task] (nan:
none), kl {bench: [n_prompts]}, nll {bench: [n_texts]}, tokens {bench: [n_texts]}, weight [n_task],
correct {bench: [n_rows]})`, and the base's.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loki.errors import LokiError

BASE = "base"  # the untrained model's method label: a reference, not a compared method
TASK_KEYS = ("task", "task_graded")
MEASURES = ("kl", "lm_loss_delta", "avg")
BOOTSTRAPPED = ("kl", "lm_loss_delta")  # recomputed from resampled items; avg is taken as recorded
LEVEL_TOLERANCE = 1e-9  # a point at 18/30 reaches the level 0.6 computed as 0.6000000000000001


# ------------------------------------------------------------------------------------------- items


@dataclass
class PointItems:
    """One evaluated model's per-item results (arrays in the files' item order)."""

    value: np.ndarray                       # float [n_task]: the item's primary metric (1/0: its top choice is the gold one)
    logprob: np.ndarray                     # float [n_task]: the gold choice's log-probability among the choices (nan: none)
    kl: dict[str, np.ndarray] = field(default_factory=dict)      # kl benchmark -> per-prompt KL [n_prompts]
    nll: dict[str, np.ndarray] = field(default_factory=dict)     # lm_loss benchmark -> summed NLL per text [n_texts]
    tokens: dict[str, np.ndarray] = field(default_factory=dict)  # lm_loss benchmark -> predicted tokens per text
    weight: np.ndarray | None = None        # float [n_task]: the item's weight in the primary (None: all 1)
    correct: dict[str, np.ndarray] = field(default_factory=dict)  # letter/cloze benchmark -> 1/0 per row [n_rows]

    def __post_init__(self) -> None:
        if self.weight is None:
            self.weight = np.ones(len(self.value))


@dataclass
class FrontierItems:
    """Every point's items by point id, and the base model's (the lm_loss_delta reference)."""

    points: dict[str, PointItems]
    base: PointItems | None = None


def _point_items(where: str, data: Mapping[str, Any]) -> PointItems:
    task = data.get("task") or []
    retention = data.get("retention") or {}
    kl, nll, tokens, correct = {}, {}, {}, {}
    for bench, rows in retention.items():
        if rows and all("kl" in r for r in rows):
            kl[bench] = np.array([float(r["kl"]) for r in rows])
        elif rows and all("nll" in r and "tokens" in r for r in rows):
            nll[bench] = np.array([float(r["nll"]) for r in rows])
            tokens[bench] = np.array([float(r["tokens"]) for r in rows])
        elif rows and all("correct" in r for r in rows):
            correct[bench] = np.array([float(bool(r["correct"])) for r in rows])
    try:  # a question's correctness, or a ranked query's metric
        value = np.array([float(r["value"]) if "value" in r else float(bool(r["correct"])) for r in task])
    except (KeyError, TypeError, ValueError) as err:
        raise LokiError(f"{where}: every task item needs 'value' (or 'correct'), got a row without {err}.") from None
    logprob = np.array([float(r["logprob"]) if r.get("logprob") is not None else math.nan for r in task])
    weight = np.array([float(r.get("weight", 1.0)) for r in task])
    return PointItems(value, logprob, kl, nll, tokens, weight, correct)


def items_from_rows(rows_by_id: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any] | None = None) -> FrontierItems:
    """FrontierItems from the files' contents ({"task": [...], "retention": {...}} per point id, and the
    base's); refuses points whose item counts differ (they must list the same items in the same order)."""
    points = {pid: _point_items(f"items/{pid}.json", rows) for pid, rows in rows_by_id.items()}
    base_items = _point_items("items/base.json", base) if base is not None else None
    everyone = list(points.items()) + ([(BASE, base_items)] if base_items is not None else [])
    if everyone:
        ref_id, ref = everyone[0]
        for pid, got in everyone[1:]:
            shapes = {"task": (len(ref.value), len(got.value))}
            for name in ("kl", "nll", "correct"):
                for bench in set(getattr(ref, name)) | set(getattr(got, name)):
                    a, b = getattr(ref, name).get(bench), getattr(got, name).get(bench)
                    shapes[f"{bench}"] = (-1 if a is None else len(a), -1 if b is None else len(b))
            for what, (n_ref, n_got) in shapes.items():
                if n_ref != n_got:
                    raise LokiError(
                        f"items of point {pid!r} list {n_got} {what} items and those of {ref_id!r} {n_ref}; "
                        "every point must be measured on the same items (rerun the frontier with one eval setting)."
                    )
    return FrontierItems(points, base_items)


def load_items(out: str | Path) -> FrontierItems:
    """The per-item results under `out/items/` (layout in the module docstring): every `<id>.json`, and
    `base.json` as the base model's. An empty FrontierItems when the folder does not exist."""
    folder = Path(out) / "items"
    if not folder.is_dir():
        return FrontierItems({}, None)
    rows = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
    base = rows.pop(BASE, None)
    return items_from_rows(rows, base)


def load_frontier(out: str | Path) -> tuple[list[dict], FrontierItems]:
    """(points of `out/points.jsonl`, their items)."""
    path = Path(out) / "points.jsonl"
    if not path.is_file():
        raise LokiError(f"frontier output '{out}' has no points.jsonl; run the frontier first.")
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return points, load_items(out)


# ----------------------------------------------------------------------------------- point values


def task_value(point: Mapping[str, Any], task_key: str = "task") -> float | None:
    if task_key not in TASK_KEYS:
        raise LokiError(f"task_key must be one of {', '.join(TASK_KEYS)}, got {task_key!r}.")
    value = point.get(task_key)
    return None if value is None or _nan(value) else float(value)


def forgetting_value(point: Mapping[str, Any], measure: str = "kl") -> float | None:
    if measure not in MEASURES:
        raise LokiError(f"forgetting measure must be one of {', '.join(MEASURES)}, got {measure!r}.")
    value = (point.get("forgetting") or {}).get(measure)
    return None if value is None or _nan(value) else float(value)


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def compared(points: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The points of compared methods (the base model's point left out)."""
    return [p for p in points if p.get("method") != BASE]


def by_method(points: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Compared methods' points by method, methods in order of first appearance."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for p in compared(points):
        out.setdefault(str(p["method"]), []).append(p)
    return out


def _tie_order(point: Mapping[str, Any]) -> tuple:
    """Which of several identical (task, forgetting) points represents them: the lowest lr, then the
    lowest seed, then the highest alpha (a trained run before its interpolations), then the id."""
    lr, seed = point.get("lr"), point.get("seed")
    return (math.inf if lr is None else float(lr), math.inf if seed is None else int(seed),
            -float(point.get("alpha", 1.0)), str(point.get("id", "")))


def _measured(points, task_key, measure) -> list[tuple[float, float, Mapping[str, Any]]]:
    out = []
    for p in points:
        t, f = task_value(p, task_key), forgetting_value(p, measure)
        if t is not None and f is not None:
            out.append((t, f, p))
    return out


# --------------------------------------------------------------------------------------- fronts


def pareto_front(points: Sequence[Mapping[str, Any]], task_key: str = "task", measure: str = "kl") -> list[Mapping[str, Any]]:
    """The points (give one method's) not dominated: b dominates a when b's task >= a's and b's
    forgetting <= a's, one of them strictly. Points with identical (task, forgetting) count once, by
    `_tie_order`'s representative. Sorted by task, then forgetting (both rise along a front). Points
    without a value on either axis are left out."""
    best: dict[tuple[float, float], Mapping[str, Any]] = {}
    for t, f, p in _measured(points, task_key, measure):
        if (t, f) not in best or _tie_order(p) < _tie_order(best[(t, f)]):
            best[(t, f)] = p
    front = []
    for (t, f), p in best.items():
        dominated = any(t2 >= t and f2 <= f and (t2 > t or f2 < f) for (t2, f2) in best)
        if not dominated:
            front.append((t, f, p))
    return [p for _, _, p in sorted(front, key=lambda x: (x[0], x[1]))]


def least_forgetting_point(points, level: float, measure: str = "kl", task_key: str = "task") -> Mapping[str, Any] | None:
    """The point with the least forgetting among those with task >= level (ties: `_tie_order`); None
    when no point reaches the level."""
    reaching = [(f, _tie_order(p), p) for t, f, p in _measured(points, task_key, measure) if t >= level - LEVEL_TOLERANCE]
    return min(reaching, key=lambda x: (x[0], x[1]))[2] if reaching else None


def least_forgetting_at(points, level: float, measure: str = "kl", task_key: str = "task") -> float | None:
    """The least forgetting among the points with task >= level; None when none reaches the level."""
    point = least_forgetting_point(points, level, measure, task_key)
    return None if point is None else forgetting_value(point, measure)


def common_levels(points_by_method: Mapping[str, Sequence[Mapping[str, Any]]], k: int = 4, task_key: str = "task",
                  base_task: float | None = None) -> list[float]:
    """`k` task levels every method reaches. top = the smallest of the methods' highest task values (so
    every method has a point at or above every level); bottom = the largest of the methods' lowest task
    values and `base_task` (below it some method reaches the level with every point, or the untrained
    model does at no forgetting). The levels are bottom + (top - bottom) * i / k for i = 1..k: evenly
    spaced, the highest is top, bottom itself is excluded. When bottom >= top: [top]. [] without methods."""
    if k < 1:
        raise LokiError(f"common_levels k must be a positive int, got {k!r}.")
    highs, lows = [], []
    for method, points in points_by_method.items():
        values = [v for v in (task_value(p, task_key) for p in points) if v is not None]
        if not values:
            return []  # a method with no task value reaches no level
        highs.append(max(values))
        lows.append(min(values))
    if not highs:
        return []
    top = min(highs)
    bottom = max(lows + ([base_task] if base_task is not None else []))
    if bottom >= top:
        return [top]
    return [bottom + (top - bottom) * i / k for i in range(1, k)] + [top]  # the top exactly, not top + rounding


# -------------------------------------------------------------------------------------- bootstrap


def _counts(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """[n_boot, n] times each item is drawn when n items are resampled with replacement (one row per
    replicate; the same row weighs every point's items: paired)."""
    if n == 0:
        return np.zeros((n_boot, 0))
    draws = rng.integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in draws]).astype(float) if n_boot else np.zeros((0, n))


def point_replicates(point_ids: Sequence[str], items: FrontierItems, measure: str, task_key: str,
                     n_boot: int, rng: np.random.Generator, recorded: Mapping[str, float] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(task [P, n_boot], forgetting [P, n_boot]) of each point recomputed on each replicate's resampled
    items: the test items are drawn once per replicate and the same draw weighs every point (paired);
    likewise each `kl` benchmark's prompts and each `lm_loss` benchmark's texts (the base's lm_loss
    uses the same draw as the points'). `avg` is recomputed from each letter/cloze benchmark's rows (one
    draw per benchmark, shared with the base) when `avg_from_items`; otherwise its recorded value
    (`recorded[id]`) fills every replicate."""
    missing = [pid for pid in point_ids if pid not in items.points]
    if missing:
        raise LokiError(f"no per-item results for point(s) {', '.join(map(repr, missing[:5]))}; the bootstrap needs items/<id>.json of every point.")
    pts = [items.points[pid] for pid in point_ids]
    ref = pts[0] if pts else None
    if ref is None:
        return np.zeros((0, n_boot)), np.zeros((0, n_boot))
    n_task = len(ref.value)
    if n_task == 0:
        raise LokiError("the per-item results hold no task items; the bootstrap needs each test item's value (or correct).")
    w_task = _counts(rng, n_boot, n_task) * ref.weight[None, :]  # [n_boot, n_task]: draws times the item's weight
    values = np.stack([p.value if task_key == "task" else p.logprob for p in pts])  # [P, n_task]
    if task_key != "task" and np.isnan(values).any():
        raise LokiError("the task axis 'task_graded' needs each test item's logprob; this task's items have none.")
    task = values @ w_task.T / w_task.sum(axis=1)[None, :]
    if measure == "kl":
        if not ref.kl:
            raise LokiError("forgetting measure 'kl' has no per-prompt results (no kl benchmark in the items).")
        per_bench = []
        for bench in sorted(ref.kl):
            w = _counts(rng, n_boot, len(ref.kl[bench]))
            per_bench.append(np.stack([p.kl[bench] for p in pts]) @ w.T / len(ref.kl[bench]))
        forgetting = np.mean(per_bench, axis=0)
    elif measure == "lm_loss_delta":
        if not ref.nll:
            raise LokiError("forgetting measure 'lm_loss_delta' has no per-text results (no lm_loss benchmark in the items).")
        if items.base is None:
            raise LokiError("forgetting measure 'lm_loss_delta' needs the base model's per-text results (items/base.json).")
        per_bench = []
        for bench in sorted(ref.nll):
            w = _counts(rng, n_boot, len(ref.nll[bench]))
            after = (np.stack([p.nll[bench] for p in pts]) @ w.T) / (np.stack([p.tokens[bench] for p in pts]) @ w.T)
            before = (items.base.nll[bench] @ w.T) / (items.base.tokens[bench] @ w.T)
            per_bench.append(after - before[None, :])
        forgetting = np.mean(per_bench, axis=0)
    elif measure == "avg" and avg_from_items(items, point_ids):
        terms = []  # per benchmark: (acc_base - acc) / acc_base [P, n_boot], nan where the base's accuracy is 0
        for bench in sorted(ref.correct):
            w = _counts(rng, n_boot, len(ref.correct[bench]))
            total = w.sum(axis=1)
            after = np.stack([p.correct[bench] for p in pts]) @ w.T / total[None, :]
            before = items.base.correct[bench] @ w.T / total  # type: ignore[union-attr]
            with np.errstate(divide="ignore", invalid="ignore"):
                terms.append(np.where(before[None, :] > 0, (before[None, :] - after) / before[None, :], math.nan))
        stacked = np.stack(terms)  # [benchmarks, P, n_boot]
        counted = (~np.isnan(stacked)).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):  # forgetting_score: benchmarks whose base is 0 leave N
            forgetting = np.where(counted > 0, 100.0 * np.nansum(stacked, axis=0) / counted, math.nan)
    elif measure == "avg":
        recorded = recorded or {}
        forgetting = np.array([[recorded.get(pid, math.nan)] * n_boot for pid in point_ids], dtype=float).reshape(len(pts), n_boot)
    else:
        raise LokiError(f"forgetting measure must be one of {', '.join(MEASURES)}, got {measure!r}.")
    return task, forgetting


def avg_from_items(items: FrontierItems | None, point_ids: Sequence[str] | None = None) -> bool:
    """Whether "avg" is recomputed from items: the base and every point (of `point_ids`, else all) hold
    per-row correctness of the same letter/cloze benchmarks (the Avg's accuracies)."""
    if items is None or items.base is None or not items.base.correct:
        return False
    benches = set(items.base.correct)
    chosen = items.points.values() if point_ids is None else [items.points[pid] for pid in point_ids if pid in items.points]
    return all(set(p.correct) == benches for p in chosen)


def percentile(values: np.ndarray, q: float) -> float:
    """The q-quantile (0..1) of `values` by linear interpolation between order statistics, where +inf
    stays +inf (numpy's interpolation gives nan between a finite value and inf)."""
    ordered = np.sort(np.asarray(values, dtype=float))
    h = (len(ordered) - 1) * q
    lo, hi = int(math.floor(h)), int(math.ceil(h))
    a, b = ordered[lo], ordered[hi]
    if lo == hi or a == b:
        return float(a)
    if math.isinf(b):
        return math.inf
    return float(a + (b - a) * (h - lo))


def matched_table(points: Sequence[Mapping[str, Any]], items: FrontierItems | None, levels: Sequence[float],
                  measure: str = "kl", n_boot: int = 1000, seed: int = 0, task_key: str = "task",
                  confidence: float = 0.95) -> dict[str, list[dict[str, Any]]]:
    """Per method (the base's point left out) and level: the least forgetting among its points with
    task >= level, and a percentile bootstrap interval.

    Estimate: `least_forgetting_at` on the recorded values (the same numbers as the fronts).
    Each of `n_boot` replicates resamples, with replacement and independently:
    - the test items (one draw shared by every point: paired), from which each point's task value is
      recomputed (the weighted mean of the items' values, e.g. the accuracy, or the graded axis = mean
      logprob);
    - each kl benchmark's prompts and each lm_loss benchmark's texts (one draw per benchmark, shared by
      every point and by the base), from which each point's kl or lm_loss_delta is recomputed; and each
      letter/cloze benchmark's rows, from which avg is recomputed (`avg_from_items`; else taken as recorded);
    - each method's seed list (as many draws as it has seeds), keeping only the points of the drawn seeds
      (interpolation points go with their run's seed);
    then recomputes the whole statistic: the least forgetting among the kept points whose recomputed task
    reaches the level, +inf when none does. The interval is the (1-c)/2 and (1+c)/2 quantiles of the
    replicates (`percentile`; the upper bound is inf when more than (1-c)/2 of them do not reach).

    Cell: {"level", "estimate" (None: not reached), "point" (its id), "low", "high", "unreached" (the
    fraction of replicates that did not reach the level), "replicates" (the n_boot values, a numpy
    array; absent when n_boot = 0)}. n_boot = 0: low = high = estimate (inf when not reached), no items
    read. Before resampling, the items of every point must reproduce its recorded values (1e-6); a
    point whose items disagree is refused (its items are not what its row says)."""
    if measure not in MEASURES:
        raise LokiError(f"forgetting measure must be one of {', '.join(MEASURES)}, got {measure!r}.")
    if int(n_boot) < 0:
        raise LokiError(f"n_boot must be a non-negative int, got {n_boot!r}.")
    methods = {m: [p for p in pts if task_value(p, task_key) is not None and forgetting_value(p, measure) is not None]
               for m, pts in by_method(points).items()}
    table: dict[str, list[dict[str, Any]]] = {}
    for method, pts in methods.items():
        row = []
        for level in levels:
            best = least_forgetting_point(pts, level, measure, task_key)
            estimate = None if best is None else forgetting_value(best, measure)
            row.append({"level": float(level), "estimate": estimate, "point": None if best is None else best.get("id"),
                        "low": estimate if estimate is not None else math.inf,
                        "high": estimate if estimate is not None else math.inf,
                        "unreached": 0.0 if estimate is not None else 1.0})
        table[method] = row
    if int(n_boot) == 0 or not methods:
        return table
    if items is None:
        raise LokiError("matched_table needs the per-item results (items) when n_boot > 0.")
    rng = np.random.default_rng(seed)
    every = [p for pts in methods.values() for p in pts]
    ids = [str(p["id"]) for p in every]
    recorded_avg = {str(p["id"]): forgetting_value(p, "avg") for p in every}
    # the identity draw (every item once) must give back the recorded numbers
    _check_items_reproduce(every, items, measure, task_key, recorded_avg)
    task, forgetting = point_replicates(ids, items, measure, task_key, int(n_boot), rng, recorded_avg)
    row_of = {pid: i for i, pid in enumerate(ids)}
    tail = (1 - confidence) / 2
    for method, pts in methods.items():
        rows = np.array([row_of[str(p["id"])] for p in pts])
        seeds = sorted({p.get("seed") for p in pts}, key=lambda s: (s is None, s if s is not None else 0))
        point_seed = np.array([seeds.index(p.get("seed")) for p in pts])
        drawn = rng.integers(0, len(seeds), size=(int(n_boot), len(seeds)))  # [B, n_seeds] seed draws
        kept = np.zeros((len(pts), int(n_boot)), dtype=bool)
        for s in range(len(seeds)):
            kept |= (point_seed[:, None] == s) & (drawn == s).any(axis=1)[None, :]
        for cell in table[method]:
            reach = kept & (task[rows] >= cell["level"] - LEVEL_TOLERANCE)
            mins = np.where(reach, forgetting[rows], math.inf).min(axis=0)
            cell["replicates"] = mins
            cell["unreached"] = float(np.isinf(mins).mean())
            cell["low"], cell["high"] = percentile(mins, tail), percentile(mins, 1 - tail)
    return table


def paired_effect(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], items: FrontierItems, measure: str = "kl",
                  n_boot: int = 1000, seed: int = 0, task_key: str = "task", confidence: float = 0.95) -> dict[str, Any]:
    """The change a variant makes at fixed training settings: over `pairs` (variant's point, modified method's
    point; the same LR and seed), the mean task difference (variant - modified) and the forgetting change,
    for `kl` the geometric mean of the ratios variant / modified (each pair counts alike, whatever its
    LR's scale), for `lm_loss_delta` the mean difference; each with a percentile bootstrap interval.

    Each replicate resamples the test items and each benchmark's held-out texts (one draw shared by both
    points of every pair, as `point_replicates` draws) and the seeds (as many draws as there are seeds; a
    drawn seed brings all its pairs), then recomputes both statistics. Returns {"pairs", "task": {estimate,
    low, high}, "forgetting": {estimate, low, high}, "kind": "ratio" | "difference"}; the intervals equal
    the estimates at n_boot = 0."""
    if measure not in BOOTSTRAPPED:
        raise LokiError(f"paired_effect bootstraps {', '.join(BOOTSTRAPPED)}, got {measure!r}.")
    pairs = list(pairs)
    if not pairs:
        raise LokiError("paired_effect needs at least one pair of points.")
    kind = "ratio" if measure == "kl" else "difference"
    ids = [str(p["id"]) for pair in pairs for p in pair]  # variant, modified, variant, modified, ...

    def effects(task: np.ndarray, forgetting: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """task [2P, B], forgetting [2P, B], weight [P, B] (how often each pair is drawn) -> ([B], [B])."""
        dt = (task[0::2] - task[1::2]) * weight
        if kind == "ratio":
            with np.errstate(divide="ignore", invalid="ignore"):
                df = np.log(forgetting[0::2] / forgetting[1::2]) * weight
        else:
            df = (forgetting[0::2] - forgetting[1::2]) * weight
        total = weight.sum(axis=0)
        task_change, forgetting_change = dt.sum(axis=0) / total, df.sum(axis=0) / total
        return task_change, (np.exp(forgetting_change) if kind == "ratio" else forgetting_change)

    task0, forgetting0 = _check_items_reproduce([p for pair in pairs for p in pair], items, measure, task_key, {})
    if kind == "ratio" and (forgetting0 <= 0).any():
        raise LokiError("the KL ratio needs a positive KL at every point of the pairs.")
    est_task, est_forgetting = effects(np.asarray(task0)[:, None], np.asarray(forgetting0)[:, None], np.ones((len(pairs), 1)))
    out = {"pairs": len(pairs), "kind": kind,
           "task": {"estimate": float(est_task[0]), "low": float(est_task[0]), "high": float(est_task[0])},
           "forgetting": {"estimate": float(est_forgetting[0]), "low": float(est_forgetting[0]), "high": float(est_forgetting[0])}}
    if int(n_boot) == 0:
        return out
    rng = np.random.default_rng(seed)
    task, forgetting = point_replicates(ids, items, measure, task_key, int(n_boot), rng)
    seeds = sorted({pair[0].get("seed") for pair in pairs}, key=lambda s: (s is None, s if s is not None else 0))
    pair_seed = np.array([seeds.index(pair[0].get("seed")) for pair in pairs])
    drawn = rng.integers(0, len(seeds), size=(int(n_boot), len(seeds)))  # [B, n_seeds]
    seed_count = np.stack([(drawn == s).sum(axis=1) for s in range(len(seeds))])  # [n_seeds, B]
    boot_task, boot_forgetting = effects(task, forgetting, seed_count[pair_seed].astype(float))
    tail = (1 - confidence) / 2
    for key, values in (("task", boot_task), ("forgetting", boot_forgetting)):
        out[key]["low"], out[key]["high"] = percentile(values, tail), percentile(values, 1 - tail)
    return out


def _check_items_reproduce(points: Sequence[Mapping[str, Any]], items: FrontierItems, measure: str, task_key: str,
                           recorded_avg: Mapping[str, float | None]) -> tuple[np.ndarray, np.ndarray]:
    """Each point's task and forgetting recomputed from its items (every item once), refusing a point whose
    items do not give its recorded values (1e-6): its items are not what its row says. Returns both arrays."""
    task, forgetting = _identity_values([str(p["id"]) for p in points], items, measure, task_key, recorded_avg)
    for i, p in enumerate(points):
        for what, got, want in ((task_key, float(task[i]), task_value(p, task_key)), (measure, float(forgetting[i]), forgetting_value(p, measure))):
            if want is None or not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
                raise LokiError(f"point {p['id']!r} records {what} {want!r} but its items give {got!r}; "
                                "the items and points.jsonl must come from the same evaluation.")
    return task, forgetting


def _identity_values(ids, items, measure, task_key, recorded_avg):
    """Each point's task and forgetting on its full items (every item once), via a one-replicate draw."""

    class Identity:  # a generator stand-in whose every draw is 0..n-1: each item exactly once
        def integers(self, low, high, size):
            return np.arange(high)[None, :].repeat(size[0], axis=0)

    task, forgetting = point_replicates(ids, items, measure, task_key, 1, Identity(), recorded_avg)  # type: ignore[arg-type]
    return task[:, 0], forgetting[:, 0]


def separated(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """True when the intervals (low, high) do not overlap (one ends strictly below the other's start);
    False when either is missing."""
    if a is None or b is None:
        return False
    return a[1] < b[0] or b[1] < a[0]


def method_pairs(methods: Iterable[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(list(methods), 2))


def one_se_lr(points: Iterable[Mapping[str, Any]], method: str) -> float | None:
    """The LR a frontier recommends for `method`: the smallest LR of its grid whose validation accuracy (mean
    over seeds of its trained runs) is within one standard error of the grid's best, SE = sqrt(p (1 - p) / n)
    at the best accuracy p over its n validation questions (the one-standard-error rule: as good as the best,
    within noise, at the smallest step, which forgets least). None when no run of `method` has a validation
    accuracy."""
    by_lr: dict[float, list[float]] = {}
    n = None
    for point in points:
        if point.get("method") != method or float(point.get("alpha", 1.0)) != 1.0 or point.get("task_val") is None:
            continue
        by_lr.setdefault(float(point["lr"]), []).append(float(point["task_val"]))
        n = int(point.get("n_task_val") or point.get("n_task") or 0)
    if not by_lr or not n:
        return None
    mean = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
    best = max(mean.values())
    threshold = best - math.sqrt(best * (1.0 - best) / n)
    return min(lr for lr, value in mean.items() if value >= threshold)
