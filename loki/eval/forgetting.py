"""The paper's forgetting score and per-benchmark before/after deltas.

    Avg = 100 / N * sum_i (S_o,i - S_t,i) / S_o,i

S_o,i is benchmark i's score before fine-tuning, S_t,i after; positive means ability was lost. The
score uses one measure per benchmark (`acc` by default: a higher-is-better score, so the ratio means
"fraction of the original score lost"); benchmarks whose original score is 0 cannot enter the ratio
and are left out of N.
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "retention/"


def split_key(key: str) -> tuple[str, str] | None:
    """`retention/<benchmark>/<measure>` -> (benchmark, measure); the benchmark may contain slashes."""
    if not key.startswith(PREFIX) or key.count("/") < 2:
        return None
    benchmark, _, measure = key[len(PREFIX) :].rpartition("/")
    return benchmark, measure


def forgetting_score(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """100/N * sum_i (before_i - after_i) / before_i over the benchmarks in both with before_i != 0."""
    shared = [name for name in before if name in after and before[name] != 0]
    if not shared:
        return float("nan")
    return 100.0 / len(shared) * sum((before[n] - after[n]) / before[n] for n in shared)


def forgetting_report(before: Mapping[str, float], after: Mapping[str, float], measure: str = "acc") -> dict:
    """{"avg": Avg over benchmarks' `measure`, "measure": measure, "n": N,
    "benchmarks": {benchmark: {measure: {"before", "after", "delta"}}}} (delta = after - before)."""
    benchmarks: dict[str, dict[str, dict[str, float]]] = {}
    for key, value_before in before.items():
        parts = split_key(key)
        if parts is None or key not in after or parts[1] == "n":
            continue
        benchmark, name = parts
        value_after = after[key]
        benchmarks.setdefault(benchmark, {})[name] = {
            "before": float(value_before),
            "after": float(value_after),
            "delta": float(value_after) - float(value_before),
        }
    primary_before = {b: m[measure]["before"] for b, m in benchmarks.items() if measure in m}
    primary_after = {b: m[measure]["after"] for b, m in benchmarks.items() if measure in m}
    return {
        "avg": forgetting_score(primary_before, primary_after),
        "measure": measure,
        "n": sum(1 for b in primary_before if primary_before[b] != 0),
        "benchmarks": benchmarks,
    }
