"""Variants against what they change: for a frontier whose design names `variants` ({variant method: the
method it modifies}), one table per variant and forgetting measure with the matched-level numbers and 95 %
intervals of the variant, the method it modifies, the paper's method (`reference`) and the best other method,
and whether the intervals separate (issue 20's docs/beyond.md). The numbers come from `studies.frontier.stats`.

The best other method (`best_other`) is the compared method, neither a variant nor the reference, that forgets
least at the task levels that it and every other candidate reach: the lowest mean of its matched-level
estimates (a level it does not reach counts as infinite), ties broken by name. It is chosen per measure.

Beside the matched levels, `paired_section` sets each trained run of a variant against the run of the method it
modifies with the same LR and seed: not a comparison at an equal task metric (the two task values differ, and
the page says by how much), but the direction of the change at fixed training settings, with every pair shown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from loki.errors import LokiError
from studies.frontier import stats
from studies.frontier.report import MEASURE_NAMES, _table, cell_text, fmt


def best_other(points: Sequence[Mapping[str, Any]], exclude: Sequence[str], measure: str, task_key: str = "task",
               k: int = 4) -> str | None:
    """The compared method outside `exclude` with the lowest mean least-forgetting over the levels every
    such method reaches (`stats.common_levels`, from the base's task value up); None without candidates."""
    methods = {m: pts for m, pts in stats.by_method(points).items() if m not in set(exclude)}
    methods = {m: [p for p in pts if stats.task_value(p, task_key) is not None and stats.forgetting_value(p, measure) is not None]
               for m, pts in methods.items()}
    methods = {m: pts for m, pts in methods.items() if pts}
    if not methods:
        return None
    base = next((p for p in points if p.get("method") == stats.BASE), None)
    levels = stats.common_levels(methods, k=k, task_key=task_key, base_task=None if base is None else stats.task_value(base, task_key))

    def score(method: str) -> float:
        values = [stats.least_forgetting_at(methods[method], level, measure, task_key) for level in levels]
        return sum(math.inf if v is None else v for v in values) / max(1, len(values))

    return min(sorted(methods), key=score)


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """One level's verdict of cell `a` against cell `b`: "less" or "more" (the intervals do not overlap and
    a forgets less or more), "overlap", or "unreached" (either has no estimate)."""
    if a["estimate"] is None or b["estimate"] is None:
        return "unreached"
    if a["high"] < b["low"]:
        return "less"
    if b["high"] < a["low"]:
        return "more"
    return "overlap"


def summary(verdicts: Sequence[str]) -> str:
    """"less at 2 of 4 levels, overlap at 2" from per-level verdicts."""
    counts = {v: verdicts.count(v) for v in ("less", "more", "overlap", "unreached") if verdicts.count(v)}
    parts = [f"{v} at {n}" for v, n in counts.items()]
    if parts:
        first, _, rest = parts[0].partition(" at ")
        parts[0] = f"{first} at {rest} of {len(verdicts)} levels"
    return ", ".join(parts) or "no common level"


def variant_section(points: Sequence[Mapping[str, Any]], items: stats.FrontierItems | None, variant: str, modifies: str,
                    reference: str | None, others: Sequence[str], measure: str, n_boot: int = 1000, seed: int = 0,
                    task_key: str = "task", k: int = 4) -> tuple[list[str], dict[str, str]]:
    """(markdown lines, {compared method: summary}) of one variant and one measure: the variant against the
    method it modifies, the reference and the best other method (chosen among `others`' complement)."""
    best = best_other(points, others, measure, task_key, k)
    compared = list(dict.fromkeys(m for m in (variant, modifies, reference, best) if m))
    present = stats.by_method(points)
    compared = [m for m in compared if m in present]
    chosen = [p for p in points if p.get("method") in compared or p.get("method") == stats.BASE]
    base = next((p for p in points if p.get("method") == stats.BASE), None)
    methods = {m: [p for p in present[m] if stats.task_value(p, task_key) is not None and stats.forgetting_value(p, measure) is not None]
               for m in compared}
    levels = stats.common_levels(methods, k=k, task_key=task_key, base_task=None if base is None else stats.task_value(base, task_key))
    roles = [(variant, "the variant"), (modifies, "what it modifies"), (reference, "the paper's method"), (best, "the best other method")]
    lines = [f"### {variant}: {MEASURE_NAMES.get(measure, measure)}", ""]
    if variant not in present or not levels:
        return lines + ["Not measured yet." if variant not in present else "No task level that every compared method reaches.", ""], {}
    why = None
    try:
        table = stats.matched_table(chosen, items, levels, measure, n_boot=n_boot, seed=seed, task_key=task_key)
    except LokiError as err:  # items that cannot give the intervals: the estimates alone, and why
        table, n_boot, why = stats.matched_table(chosen, None, levels, measure, n_boot=0, task_key=task_key), 0, str(err)
    bootstrapped = n_boot > 0
    if why:
        lines += [f"No bootstrap: {why.rstrip('.')}.", ""]
    header = ["method", "role"] + [f"{task_key} >= {fmt(level)}" for level in levels]
    lines += _table(header, [[m, ", ".join(r for mm, r in roles if mm == m)] + [cell_text(c, bootstrapped) for c in table[m]]
                             for m in compared])
    verdicts = {}
    if bootstrapped:
        lines += ["", f"{variant} forgets (95 % intervals that do not overlap):", ""]
        for m in compared[1:]:
            verdicts[m] = summary([compare(a, b) for a, b in zip(table[variant], table[m])])
            lines.append(f"- against {m}: {verdicts[m]}")
    return lines + [""], verdicts


def paired_runs(points: Sequence[Mapping[str, Any]], variant: str, modifies: str) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(variant's point, modified method's point) for every trained run (alpha 1) of the variant whose LR and
    seed the modified method also ran, in LR then seed order."""
    def runs(method: str) -> dict[tuple[float, int], Mapping[str, Any]]:
        return {(float(p["lr"]), int(p["seed"])): p for p in points
                if p.get("method") == method and float(p.get("alpha", 1.0)) == 1.0 and p.get("lr") is not None and p.get("seed") is not None}

    mine, theirs = runs(variant), runs(modifies)
    return [(mine[key], theirs[key]) for key in sorted(set(mine) & set(theirs))]


def _range(values: Sequence[float], sign: bool = False) -> str:
    shown = [f"{v:+.3f}" if sign else f"{v:.2f}" for v in (min(values), max(values))]
    return shown[0] if shown[0] == shown[1] else f"{shown[0]} to {shown[1]}"


def paired_summary(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], measure: str, task_key: str = "task",
                   labels: tuple[str, str] = ("variant", "modified")) -> str:
    """"lower in 3 of 3 pairs (variant / modified 0.26 to 0.50)" for one forgetting measure; the ratio only
    where both values are positive."""
    both = [(stats.forgetting_value(a, measure), stats.forgetting_value(b, measure)) for a, b in pairs]
    both = [(a, b) for a, b in both if a is not None and b is not None]
    if not both:
        return "no pair measured"
    lower = sum(a < b for a, b in both)
    ratios = [a / b for a, b in both if a > 0 and b > 0]
    return f"lower in {lower} of {len(both)} pairs" + (f" ({labels[0]} / {labels[1]} {_range(ratios)})" if len(ratios) == len(both) else "")


def paired_section(points: Sequence[Mapping[str, Any]], variant: str, modifies: str, measures: Sequence[str], task_key: str = "task",
                   items: stats.FrontierItems | None = None, n_boot: int = 0, seed: int = 0,
                   labels: tuple[str, str] = ("variant", "modified")) -> list[str]:
    """Markdown: every run of the variant beside the modified method's run with the same LR and seed, the
    task and each measure, and per measure in how many pairs the variant's value is lower; with items and
    n_boot > 0, the mean task change and the forgetting change over the pairs with 95 % intervals
    (`stats.paired_effect`). `labels` name the two sides in the text (two methods that are not a variant
    and what it modifies: their names)."""
    first, second = labels
    pairs = paired_runs(points, variant, modifies)
    lines = [f"### {variant} against {modifies} at the same LR and seed", ""]
    if not pairs:
        return lines + ["No run of both at the same LR and seed yet.", ""]
    header = ["LR", "seed", f"{task_key}: {first}", second]
    for measure in measures:
        header += [f"{measure}: {first}", second]
    rows = []
    for a, b in pairs:
        row = [f"{float(a['lr']):g}", str(a["seed"]), fmt(stats.task_value(a, task_key)), fmt(stats.task_value(b, task_key))]
        for measure in measures:
            row += [fmt(stats.forgetting_value(a, measure)), fmt(stats.forgetting_value(b, measure))]
        rows.append(row)
    tasks = [(stats.task_value(a, task_key), stats.task_value(b, task_key)) for a, b in pairs]
    tasks = [a - b for a, b in tasks if a is not None and b is not None]
    lines += _table(header, rows) + [""]
    lines += ["Not at an equal task metric: " + (f"the {first} run's {task_key} minus the {second} run's is {_range(tasks, sign=True)} "
              f"(higher in {sum(t > 0 for t in tasks)}, equal in {sum(t == 0 for t in tasks)}, lower in {sum(t < 0 for t in tasks)} of {len(tasks)} pairs)."
              if tasks else "no task values."), ""]
    lines += [f"- {MEASURE_NAMES.get(measure, measure)}: {paired_summary(pairs, measure, task_key, labels)}" for measure in measures]
    if items is None or not n_boot:
        return lines + [""]
    seeds = sorted({int(a["seed"]) for a, _ in pairs})
    spread = (f"over test items, held-out texts and seeds ({len(seeds)} seeds)" if len(seeds) > 1 else
              f"over test items and held-out texts only: one seed ({seeds[0]}), so the seeds' spread is not in them")
    lines += ["", f"Over the {len(pairs)} pairs, with 95 % bootstrap intervals {spread} (`stats.paired_effect`):", ""]
    for measure in measures:
        if measure not in stats.BOOTSTRAPPED:
            continue
        try:
            effect = stats.paired_effect(pairs, items, measure, n_boot=n_boot, seed=seed, task_key=task_key)
        except LokiError as err:
            lines.append(f"- {MEASURE_NAMES.get(measure, measure)}: no interval ({str(err).rstrip('.')}).")
            continue
        t, f = effect["task"], effect["forgetting"]
        what = f"{first} / {second}, geometric mean" if effect["kind"] == "ratio" else f"{first} - {second}, mean"
        null = 1.0 if effect["kind"] == "ratio" else 0.0
        side = "below" if f["high"] < null else "above" if f["low"] > null else "includes"
        lines.append(f"- {MEASURE_NAMES.get(measure, measure)} ({what}): {f['estimate']:.3f} [{f['low']:.3f}, {f['high']:.3f}]"
                     f" ({'interval ' + side + ' ' + format(null, 'g') if side != 'includes' else 'the interval includes ' + format(null, 'g')});"
                     f" {task_key} change {t['estimate']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]")
    return lines + [""]


def variants_markdown(points: Sequence[Mapping[str, Any]], items: stats.FrontierItems | None, variants: Mapping[str, str],
                      reference: str | None, measures: Sequence[str], n_boot: int = 1000, seed: int = 0, title: str = "Variants") -> str:
    """The variants page: a summary table, then one section per variant and measure (`variant_section`)."""
    others = [*variants, *([reference] if reference else [])]
    sections, rows = [], []
    for variant, modifies in variants.items():
        for measure in measures:
            lines, verdicts = variant_section(points, items, variant, modifies, reference, others, measure, n_boot, seed)
            sections += lines
            rows.append([variant, measure, modifies] + ["; ".join(f"{m}: {v}" for m, v in verdicts.items()) or "-"])
        sections += paired_section(points, variant, modifies, measures, items=items, n_boot=n_boot, seed=seed)
    head = [f"# {title}", "",
            "Each variant against the method it modifies, the paper's method"
            + (f" (`{reference}`)" if reference else "") + " and the best other method of the design (the one that forgets least "
            "at the levels every candidate reaches), at task levels all of them reach: the least forgetting at or above each "
            "level with its 95 % bootstrap interval over test items, held-out texts and seeds (`studies/frontier/variants.py`). "
            "After each variant's tables, its runs beside the modified method's at the same LR and seed.", ""]
    head += _table(["variant", "measure", "modifies", "it forgets less / more / overlapping, per compared method"], rows)
    return "\n".join(head + [""] + sections).rstrip() + "\n"
