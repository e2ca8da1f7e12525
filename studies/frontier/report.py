"""The frontier's report: frontier.md (fronts, matched-level table with bootstrap intervals, which
methods separate), frontier.png (the fronts per forgetting measure) and the W&B table's rows.
The numbers come from `studies.frontier.stats`; this module only lays them out."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loki.errors import LokiError
from studies.frontier import stats

log = logging.getLogger(__name__)

MEASURE_NAMES = {"kl": "KL from the base (nats)", "lm_loss_delta": "LM-loss change (nats/token)", "avg": "Avg (paper, % lost)"}
TASK_NAMES = {"task": "task metric", "task_graded": "gold log-prob"}
WANDB_COLUMNS = ["id", "method", "lr", "seed", "alpha", "steps", "task", "task_graded", "kl", "lm_loss_delta", "avg",
                 "n_task", "run_dir"]


def fmt(value: float | None) -> str:
    """Three decimals (two significant digits in scientific notation below 0.01); "-" for None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"


def _lr(value: Any) -> str:
    return "-" if value is None else f"{float(value):g}"


def cell_text(cell: Mapping[str, Any], bootstrapped: bool = True) -> str:
    """"0.123 [0.101, 0.150]", "not reached", or with an infinite upper bound "0.123 [0.101, inf]
    (not reached in 31 % of replicates)"."""
    if cell["estimate"] is None:
        return "not reached"
    if not bootstrapped:
        return fmt(cell["estimate"])
    text = f"{fmt(cell['estimate'])} [{fmt(cell['low'])}, {fmt(cell['high'])}]"
    if math.isinf(cell["high"]):
        text += f" (not reached in {100 * cell['unreached']:.0f} % of replicates)"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def front_rows(points: Sequence[Mapping[str, Any]], measure: str, task_key: str) -> list[list[str]]:
    """One row per front point of each method: method, lr, seed, alpha, task, forgetting."""
    rows = []
    for method, pts in stats.by_method(points).items():
        for p in stats.pareto_front(pts, task_key, measure):
            rows.append([method, _lr(p.get("lr")), str(p.get("seed", "-")), f"{float(p.get('alpha', 1.0)):g}",
                         fmt(stats.task_value(p, task_key)), fmt(stats.forgetting_value(p, measure))])
    return rows


def _has(points, measure: str, task_key: str) -> bool:
    return any(stats.task_value(p, task_key) is not None and stats.forgetting_value(p, measure) is not None
               for p in stats.compared(points))


def section(points: Sequence[Mapping[str, Any]], items: stats.FrontierItems | None, measure: str, task_key: str,
            levels: Sequence[float] | None = None, k: int = 4, n_boot: int = 1000, seed: int = 0) -> list[str]:
    """One (forgetting measure, task axis) section: fronts, matched-level table, separations."""
    lines = [f"## {MEASURE_NAMES.get(measure, measure)} against {TASK_NAMES.get(task_key, task_key)}", ""]
    lines.append(f"Pareto fronts (higher {task_key}, lower {measure}):")
    lines.append("")
    lines += _table(["method", "lr", "seed", "alpha", task_key, measure], front_rows(points, measure, task_key))
    methods = stats.by_method(points)
    if levels is None:
        base = next((p for p in points if p.get("method") == stats.BASE), None)
        levels = stats.common_levels(methods, k=k, task_key=task_key,
                                     base_task=None if base is None else stats.task_value(base, task_key))
    if not levels:
        return lines + ["", "No task level that every method reaches.", ""]
    boot = n_boot if items is not None and items.points else 0
    why = "n_boot = 0" if n_boot == 0 else "no per-item results"
    try:
        table = stats.matched_table(points, items, levels, measure, n_boot=boot, seed=seed, task_key=task_key)
    except LokiError as err:  # items that cannot give this measure: the estimates alone, and say why
        log.warning("frontier report, %s against %s: no bootstrap: %s", measure, task_key, err)
        table, boot, why = stats.matched_table(points, None, levels, measure, n_boot=0, task_key=task_key), 0, str(err)
    bootstrapped = boot > 0
    what = ("least forgetting at or above each level, 95 % bootstrap interval over test items, held-out texts and seeds"
            if bootstrapped else f"least forgetting at or above each level; no bootstrap: {why.rstrip('.')}")
    if measure == "avg" and bootstrapped:
        what += ("; Avg recomputed from the held-out questions, resampled with the base's" if stats.avg_from_items(items)
                 else "; Avg itself taken as recorded")
    lines += ["", f"Matched levels ({what}):", ""]
    header = ["method"] + [f"{task_key} >= {fmt(level)}" for level in levels]
    lines += _table(header, [[m] + [cell_text(c, bootstrapped) for c in table[m]] for m in table])
    if bootstrapped and len(table) > 1:
        lines += ["", "Separation at each level (\"a < b\": the intervals do not overlap and a forgets less):", ""]
        for i, level in enumerate(levels):
            apart, overlap, unreached = [], [], []
            for a, b in stats.method_pairs(table):
                ca, cb = table[a][i], table[b][i]
                if ca["estimate"] is None or cb["estimate"] is None:
                    unreached.append(f"{a}/{b}")
                elif stats.separated((ca["low"], ca["high"]), (cb["low"], cb["high"])):
                    apart.append(f"{a} < {b}" if ca["high"] < cb["low"] else f"{b} < {a}")
                else:
                    overlap.append(f"{a}/{b}")
            parts = [f"{label}: {', '.join(pairs)}" for label, pairs in
                     (("separated", apart), ("overlap", overlap), ("not both reached", unreached)) if pairs]
            lines.append(f"- {task_key} >= {fmt(level)}: " + "; ".join(parts))
    return lines + [""]


def frontier_markdown(points: Sequence[Mapping[str, Any]], items: stats.FrontierItems | None,
                      measures: Sequence[str] = ("kl", "lm_loss_delta", "avg"), task_keys: Sequence[str] = ("task", "task_graded"),
                      levels: Sequence[float] | None = None, k: int = 4, n_boot: int = 1000, seed: int = 0,
                      title: str = "Frontier") -> str:
    """frontier.md: per task axis and forgetting measure that the points carry, a section (`section`).
    `levels` (on the "task" axis; the graded axis always uses `common_levels`) fixes the matched levels;
    None picks `k` common ones. Without items (or with n_boot = 0) the table has no intervals."""
    lines = [f"# {title}", ""]
    methods = stats.by_method(points)
    counts = ", ".join(f"{m}: {len(p)}" for m, p in methods.items())
    lines.append(f"Points per method: {counts}. Interpolation points (alpha < 1) belong to their run's method.")
    base = next((p for p in points if p.get("method") == stats.BASE), None)
    if base is not None:
        graded = stats.task_value(base, "task_graded")
        metric = f" ({base['task_metric']})" if base.get("task_metric") else ""
        lines.append(f"Base model: task{metric} {fmt(stats.task_value(base, 'task'))}"
                     + (f", gold log-prob {fmt(graded)}." if graded is not None else "."))
    lines.append("")
    for task_key in task_keys:
        for measure in measures:
            if _has(points, measure, task_key):
                lines += section(points, items, measure, task_key, levels if task_key == "task" else None, k, n_boot, seed)
    return "\n".join(lines).rstrip() + "\n"


def frontier_plot(points: Sequence[Mapping[str, Any]], path: str | Path, measures: Sequence[str] = ("kl", "lm_loss_delta", "avg"),
                  task_key: str = "task") -> Path:
    """frontier.png: one panel per forgetting measure the points carry (x = forgetting, y = task);
    each method's front as a line, all its points as light markers, interpolation points (alpha < 1)
    hollow, the base model as a black star. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    shown = [m for m in measures if _has(points, m, task_key)] or list(measures[:1])
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = stats.by_method(points)
    base = next((p for p in points if p.get("method") == stats.BASE), None)
    for ax, measure in zip(axes[0], shown):
        for i, (method, pts) in enumerate(methods.items()):
            colour = colours[i % len(colours)]
            for interpolated in (False, True):
                xs, ys = [], []
                for p in pts:
                    t, f = stats.task_value(p, task_key), stats.forgetting_value(p, measure)
                    if t is not None and f is not None and (float(p.get("alpha", 1.0)) < 1) == interpolated:
                        xs.append(f)
                        ys.append(t)
                ax.scatter(xs, ys, s=22, alpha=0.45, edgecolors=colour,
                           facecolors="none" if interpolated else colour, linewidths=1.0)
            front = stats.pareto_front(pts, task_key, measure)
            ax.plot([stats.forgetting_value(p, measure) for p in front], [stats.task_value(p, task_key) for p in front],
                    "-o", color=colour, lw=1.6, ms=3, label=method)
        if base is not None and stats.task_value(base, task_key) is not None and stats.forgetting_value(base, measure) is not None:
            ax.plot([stats.forgetting_value(base, measure)], [stats.task_value(base, task_key)], "k*", ms=9)
        ax.set_xlabel(MEASURE_NAMES.get(measure, measure))
        ax.set_ylabel(TASK_NAMES.get(task_key, task_key))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", ls="", color="grey", alpha=0.6, label="trained run"),
                Line2D([], [], marker="o", ls="", markerfacecolor="none", color="grey", label="interpolation (alpha < 1)")]
    if base is not None:
        handles.append(Line2D([], [], marker="*", ls="", color="k", ms=9, label="base model"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def wandb_table(points: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) for `wandb.Table(columns=..., data=...)`: one row per point (the base's included)."""
    rows = []
    for p in points:
        forgetting = p.get("forgetting") or {}
        rows.append([p.get("id"), p.get("method"), p.get("lr"), p.get("seed"), p.get("alpha"), p.get("steps"),
                     p.get("task"), p.get("task_graded"), forgetting.get("kl"), forgetting.get("lm_loss_delta"),
                     forgetting.get("avg"), p.get("n_task"), p.get("run_dir")])
    return list(WANDB_COLUMNS), rows
