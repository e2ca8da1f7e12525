"""`publish=true`: the frontier's page in docs/, generated from the raw points, with the raw points beside it.

    python -m studies.frontier frontier=smollm135m report_only=true publish=true

writes
- `docs/frontier_<name>.md`: the design (from the frontier config), what is measured and what remains
  (with an estimate from the measured rates), the commands that reproduce it, the time it took, and the
  report (fronts, matched-level tables with intervals, separations) that `frontier.md` holds;
- `docs/frontier_<name>.png`: the picture;
- `docs/frontier_data/<name>/`: `points.jsonl`, `base.json` and `items/` (what the tables are computed from).

The reading of the tables in words is not generated: it lives in the pages that cite them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from studies.frontier.run import FrontierConfig, design, front_seed_design

DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"


def _lr(value: float) -> str:
    return f"{value:g}"


def progress(frontier: FrontierConfig, measured_ids: set[str], points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What is measured and what remains, per pass: the first pass (the design) and, once it is whole, the
    front-seeds pass. `remaining` lists (point id, is a trained run) of every missing point of a known pass."""
    first = design(frontier)
    first_ids = [(key.point_id(a), a == 1.0) for key, alphas in first for a in (1.0, *alphas)]
    out = {"first_total": len(first_ids), "first_done": sum(i in measured_ids for i, _ in first_ids),
           "second_total": None, "second_done": 0, "remaining": [(i, run) for i, run in first_ids if i not in measured_ids]}
    if frontier.front_seeds and not out["remaining"]:
        second_ids = [(key.point_id(a), a == 1.0) for key, alphas in front_seed_design(frontier, points) for a in (1.0, *alphas)]
        out.update(second_total=len(second_ids), second_done=sum(i in measured_ids for i, _ in second_ids),
                   remaining=[(i, run) for i, run in second_ids if i not in measured_ids])
    return out


def rates(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean seconds of a trained run (training and its evaluation) and of an interpolation point, over the
    design and per method (`methods`: an anchored run costs several times a plain one, so a design's mean
    misprices what one method has left), and the CPU seconds of every measured point (one thread each),
    from the points' own timings."""
    runs, interps, total = [], [], 0.0
    per_method: dict[str, dict[str, list[float]]] = {}
    for p in points:
        if p.get("method") == "base":
            continue
        evaluated = sum(float(v) for v in (p.get("seconds_eval") or {}).values())
        spent = float(p.get("seconds_train") or 0.0) + evaluated
        total += spent
        kind = "run" if float(p.get("alpha", 1.0)) == 1.0 else "interpolation"
        (runs if kind == "run" else interps).append(spent)
        per_method.setdefault(str(p.get("method")), {"run": [], "interpolation": []})[kind].append(spent)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    methods = {m: {kind: mean(xs) for kind, xs in kinds.items()} for m, kinds in per_method.items()}
    return {"run": mean(runs), "interpolation": mean(interps), "cpu_seconds": total, "runs": len(runs), "interpolations": len(interps),
            "methods": methods}


def remaining_cpu(remaining: Sequence[tuple[str, bool]], speed: Mapping[str, Any]) -> tuple[float, int]:
    """CPU seconds of the missing points (point id, is a trained run): each at its method's own measured rate
    for its kind, else at the design's mean (0 s when the design has none either); and how many points had
    no rate of their method's own."""
    cpu, at_mean = 0.0, 0
    for point_id, is_run in remaining:
        kind = "run" if is_run else "interpolation"
        own = (speed.get("methods") or {}).get(point_id.split("__")[0], {}).get(kind)
        if own is None:
            at_mean += 1
            own = speed[kind] or 0.0
        cpu += own
    return cpu, at_mean


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def _design_lines(frontier: FrontierConfig, name: str) -> list[str]:
    lines = ["## Design", "",
             f"- **Model:** `model={frontier.model}`. **Task:** `task={frontier.task}`. **Budget:** {frontier.steps} optimizer steps for every run.",
             f"- **Seeds:** {', '.join(map(str, frontier.seeds))} for every run (the first pass)"
             + (f"; then {', '.join(map(str, frontier.front_seeds))} for every run the matched tables read, at each matched level"
                f" and at level -+ {frontier.front_slack:g} (the second pass)." if frontier.front_seeds else "."),
             f"- **Interpolation points:** `theta_0 + alpha (theta_run - theta_0)` at alpha = {', '.join(f'{a:g}' for a in frontier.alphas)}"
             f" for each method's {frontier.interpolate_top} largest LRs.",
             f"- **Forgetting measures:** {', '.join(frontier.measures)}. **Bootstrap replicates:** {frontier.n_boot}.",
             f"- **Every run's overrides:** {', '.join(f'`{o}`' for o in frontier.overrides) or 'none'}.",
             f"- **Config:** `conf/frontier/{name}.yaml`. Raw points and per-item results: `docs/frontier_data/{name}/`.", "",
             "| method | train.py overrides | LR grid |", "|---|---|---|"]
    for method in frontier.methods:
        lines.append(f"| {method.name} | {' '.join(f'`{o}`' for o in method.overrides) or '-'} | {', '.join(_lr(lr) for lr in method.lrs)} |")
    return lines + [""]


def _status_lines(frontier: FrontierConfig, state: Mapping[str, Any], speed: Mapping[str, Any]) -> list[str]:
    lines = ["## Status", ""]
    first = f"first pass: {state['first_done']} of {state['first_total']} points"
    if not frontier.front_seeds:
        second = ""
    elif state["second_total"] is None:
        second = "; front-seeds pass: chosen once the first pass is whole"
    else:
        second = f"; front-seeds pass: {state['second_done']} of {state['second_total']} points"
    remaining = state["remaining"]
    complete = not remaining and (state["second_total"] is not None or not frontier.front_seeds)
    lines.append(f"Measured: {first}{second}." + (" **Complete.**" if complete else " **Partial: the tables below read only the measured points.**"))
    if remaining:
        by_method: dict[str, list[str]] = {}
        for point_id, _ in remaining:
            method, lr, seed, alpha = point_id.split("__")
            by_method.setdefault(method, []).append(f"{lr[2:]} s{seed[4:]}" + ("" if alpha == "a1" else f" a{alpha[1:]}"))
        lines += ["", "Not measured yet (LR, seed, alpha when an interpolation point):", ""]
        lines += [f"- {method}: {', '.join(ids)}" for method, ids in by_method.items()]
        runs = sum(is_run for _, is_run in remaining)
        if speed["run"] is not None:
            cpu, at_mean = remaining_cpu(remaining, speed)
            per_interpolation = ("no interpolation point timed yet, so they count as 0 s" if speed["interpolation"] is None
                                 else f"{speed['interpolation']:.0f} s an interpolation point")
            lines += ["", f"At each method's own measured rates (over the design: {speed['run']:.0f} s a trained run with its evaluation, "
                      f"{per_interpolation}, one thread; {at_mean} of the points left have no rate of their method's own and count at "
                      f"the design's mean), the {runs} runs and "
                      f"{len(remaining) - runs} interpolation points left take about {_hours(cpu)} of CPU time, "
                      f"{_hours(cpu / 2)} on two processes" + ("; the front-seeds pass comes after." if frontier.front_seeds and state["second_total"] is None else ".")]
    return lines + [""]


def restore(frontier: FrontierConfig, out: Path, docs_dir: Path = DOCS_DIR) -> int:
    """Write the published points (`docs_dir/frontier_data/<name>/`) that `out` lacks back into it, with their
    items, so that a fresh clone resumes where the committed page stopped; returns how many were written.
    The base is not restored: it is measured again (deterministically), with the base distributions the
    KL of new points needs. A restored point keeps its settings digest, so it is reused only if the design
    still makes it the same way."""
    from loki.files import write_atomic

    data = docs_dir / "frontier_data" / str(frontier.name)
    if not (data / "points.jsonl").is_file():
        return 0
    written = 0
    for line in (data / "points.jsonl").read_text().splitlines():
        point = json.loads(line)
        point_id = str(point.get("id"))
        target = out / "points" / f"{point_id}.json"
        items = data / "items" / f"{point_id}.json"
        if point_id == "base" or target.exists() or not items.is_file():
            continue
        (out / "items").mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "items" / items.name, items.read_bytes())
        write_atomic(target, json.dumps(point, indent=1, sort_keys=True).encode())
        written += 1
    return written


def publish(frontier: FrontierConfig, out: Path, points: Sequence[Mapping[str, Any]], docs_dir: Path = DOCS_DIR) -> Path:
    """Copy the raw points, items and picture into `docs_dir` and write `frontier_<name>.md` there."""
    name = str(frontier.name)
    data = docs_dir / "frontier_data" / name
    if data.exists():
        shutil.rmtree(data)
    (data / "items").mkdir(parents=True)
    for file in ("points.jsonl", "base.json"):
        shutil.copy2(out / file, data / file)
    measured_ids = {str(p.get("id")) for p in points}
    for item in sorted((out / "items").glob("*.json")):
        if item.stem in measured_ids:  # items of a point still being measured stay behind
            shutil.copy2(item, data / "items" / item.name)
    picture = docs_dir / f"frontier_{name}.png"
    if (out / "frontier.png").is_file():
        shutil.copy2(out / "frontier.png", picture)
    base = json.loads((out / "base.json").read_text())
    speed = rates(points)
    state = progress(frontier, measured_ids, points)
    report = (out / "frontier.md").read_text().splitlines()
    body = ["#" + line if line.startswith("#") else line for line in report[1:]]  # one level down, under "Results"
    lines = [f"# Frontier: {name}", "",
             f"Generated by `python -m studies.frontier frontier={name} report_only=true publish=true` from the raw points in "
             f"`docs/frontier_data/{name}/`: regenerate it rather than edit it. What the tables say, in words, is in the pages that cite it.", ""]
    lines += _design_lines(frontier, name)
    lines += _status_lines(frontier, state, speed)
    lines += ["## Reproduce (from a fresh cache)", "", "```bash",
              f"python -m studies.frontier frontier={name} shard=0/2 &   # two processes, one per core",
              f"python -m studies.frontier frontier={name} shard=1/2",
              f"python -m studies.frontier frontier={name} report_only=true publish=true   # this page", "```", "",
              "A stopped frontier resumes: every measured point is reused. To go on from the points committed here "
              f"instead of remaking them, start both processes with `restore=true` (for example `python -m studies.frontier "
              f"frontier={name} restore=true shard=0/2`): it copies them into the output folder first.", "",
              "## Time", "",
              f"CPU time of the measured points (one thread each, summed from their own timings): {_hours(speed['cpu_seconds'])} "
              f"for {speed['runs']} trained runs and {speed['interpolations']} interpolation points, plus {base.get('seconds', 0):.0f} s for the base "
              "model's measurements; on two processes the wall time is about half." + (
                  f" Per trained run (training and evaluation) {speed['run']:.0f} s on average; per interpolation point {speed['interpolation']:.0f} s."
                  if speed["run"] is not None and speed["interpolation"] is not None else ""), "",
              "## Results", ""]
    lines += body
    if picture.is_file():
        lines += ["", f"![{name}: task metric against forgetting, per method]({picture.name})"]
    page = docs_dir / f"frontier_{name}.md"
    page.write_text("\n".join(lines).rstrip() + "\n")
    if frontier.variants:
        write_variants_page(frontier, out, points, docs_dir, complete=not state["remaining"] and (state["second_total"] is not None or not frontier.front_seeds))
    return page


def write_variants_page(frontier: FrontierConfig, out: Path, points: Sequence[Mapping[str, Any]], docs_dir: Path = DOCS_DIR,
                        complete: bool = True) -> Path:
    """docs/<variants_page>.md: each variant of the design against what it modifies, the reference and the best
    other method (`studies.frontier.variants`), from the same raw points as the frontier's page."""
    from studies.frontier import stats
    from studies.frontier.variants import variants_markdown

    name = str(frontier.name)
    title = f"Variants of frontier {name}"
    text = variants_markdown(points, stats.load_items(out), frontier.variants, frontier.reference, frontier.measures,
                             int(frontier.n_boot), title=title)
    head, _, rest = text.partition("\n\n")
    note = (f"Generated by `python -m studies.frontier frontier={name} report_only=true publish=true` from the raw points in "
            f"`docs/frontier_data/{name}/` (design, status and every method's tables: [frontier_{name}.md](frontier_{name}.md)); "
            "regenerate it rather than edit it.")
    if not complete:
        note += " **Partial: the design is not whole yet, so the tables read only the measured points.**"
    page = docs_dir / f"{frontier.variants_page}.md"
    page.write_text(f"{head}\n\n{note}\n\n{rest}")
    return page
