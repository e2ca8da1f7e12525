"""The paper's forgetting score, per-benchmark before/after deltas, and the graded damage beside them.

    Avg = 100 / N * sum_i (S_o,i - S_t,i) / S_o,i

S_o,i is benchmark i's score before fine-tuning, S_t,i after; positive means ability was lost. The
score uses one higher-is-better measure per benchmark: `score` where the benchmark has one (an
lm-evaluation-harness task's headline metric, loki.eval.lm_harness), else `measure` (`acc` by default),
so the ratio means "fraction of the original score lost"; benchmarks whose original score is 0 cannot
enter the ratio and are left out of N.

Reported beside the Avg, never averaged into it (they are not scores in [0, 1] and "before" may be 0):
- `kl`: per `kl` benchmark, KL(p_base || p_after) in nats (its "before" is 0 by definition);
- `lm_loss`: per `lm_loss` benchmark, the held-out mean token NLL before, after and the change (nats,
  positive = worse).
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "retention/"
COUNT_MEASURES = ("n", "tokens")  # describe the evaluation, not the model: not compared
SCORE = "score"


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
    """{"avg": Avg over benchmarks' primary measure (`score`, else `measure`), "measure": measure, "n": N,
    "benchmarks": {benchmark: {measure: {"before", "after", "delta"}}} (delta = after - before),
    "kl": {benchmark: KL after}, "lm_loss": {benchmark: {"before", "after", "delta"}}}."""
    benchmarks: dict[str, dict[str, dict[str, float]]] = {}
    for key, value_before in before.items():
        parts = split_key(key)
        if parts is None or key not in after or parts[1] in COUNT_MEASURES:
            continue
        benchmark, name = parts
        value_after = after[key]
        benchmarks.setdefault(benchmark, {})[name] = {
            "before": float(value_before),
            "after": float(value_after),
            "delta": float(value_after) - float(value_before),
        }
    primary = {b: m.get(SCORE, m.get(measure)) for b, m in benchmarks.items()}
    primary = {b: row for b, row in primary.items() if row is not None}
    primary_before = {b: row["before"] for b, row in primary.items()}
    primary_after = {b: row["after"] for b, row in primary.items()}
    return {
        "avg": forgetting_score(primary_before, primary_after),
        "measure": measure,
        "n": sum(1 for b in primary_before if primary_before[b] != 0),
        "benchmarks": benchmarks,
        "kl": {b: m["kl"]["after"] for b, m in benchmarks.items() if "kl" in m},
        "lm_loss": {b: dict(m["lm_loss"]) for b, m in benchmarks.items() if "lm_loss" in m},
    }
