"""What both studies write: numbers as text, markdown tables, the task-against-forgetting plot, the
comparison at an equal task metric, and the generated block of a docs page."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

NAN = float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std of the values that are not nan (std 0 for one value; nan, nan for none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return NAN, NAN
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def spread(pair: tuple[float, float], digits: int = 4, show_zero: bool = False) -> str:
    """"mean ± std" ("mean" when the std is 0 and `show_zero` is off; "-" when there is no mean)."""
    mean, std = pair
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if (std or show_zero) else f"{mean:.{digits}f}"


def spread_of(values: Sequence[float], digits: int = 4) -> str:
    """`spread` of raw values: "mean ± std" over two or more, the value alone for one."""
    return spread(mean_std(list(values)), digits, show_zero=len(values) > 1)


def table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines; `align` has one letter per column: l (left) or r (right)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def equal_task_level(curves: Mapping[str, Sequence[tuple[float, object]]]) -> float:
    """The highest task metric that every arm reaches with some run: min over arms of max over runs."""
    return min(max(task for task, _ in points) for points in curves.values())


def cheapest_reaching(points: Sequence[tuple[float, float, object]], level: float):
    """Among (task, cost, tag) points whose task reaches `level`, the (cost, tag) of the least cost (ties: the
    smaller tag); (nan, None) when none reaches it or every cost is nan."""
    reached = [(cost, tag) for task, cost, tag in points if task >= level - 1e-9 and not math.isnan(cost)]
    return min(reached) if reached else (NAN, None)


def tradeoff_plot(ax, points: Sequence[tuple[str, tuple[float, float], tuple[float, float], str]], colours) -> None:
    """One error-bar point per arm: (label, forgetting mean/std, task mean/std, marker); an arm without a
    forgetting (no model: a chance level) is a dashed horizontal line."""
    for index, (label, (x, xs), (y, ys), marker) in enumerate(points):
        if math.isnan(x):
            ax.axhline(y, linestyle="--", color="grey", label=label)
            continue
        ax.errorbar(x, y, xerr=xs, yerr=ys, fmt=marker, capsize=3, label=label, color=colours(index % 20))
    ax.grid(alpha=0.3)


def figure(panels: int, size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    return plt, fig, axes[0]


def save(plt, fig, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


BEGIN, END = "<!-- real-study:begin -->", "<!-- real-study:end -->"


def write_doc(doc: Path, generated: str, title: str, preface: str) -> Path:
    """Put the generated tables between the markers of `doc` (the prose around them stays); a new page if none."""
    block = f"{BEGIN}\n{generated}\n{END}"
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        doc.write_text(head + block + rest.split(END, 1)[1])
    else:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(f"# {title}\n\n{preface}\n\n{block}\n")
    return doc


def write_json(path: Path, data, sort_keys: bool = False) -> Path:
    """`data` as indented JSON, written atomically (nan as NaN, numbers that are not floats as floats)."""
    import json

    from loki.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=float).encode())
