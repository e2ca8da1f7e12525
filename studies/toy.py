"""The toy study: does LoKI forget less than full fine-tuning and LoRA, and does KVA find rows that matter?

    python -m studies                             # every arm x 3 seeds, + the suppression check
    python -m studies quick=40 'seeds=[0]'        # CI-sized: fewer steps, one seed
    python -m studies 'overrides=[model.seed=1]'  # train.py overrides for every run

Writes `study.md`, `study.json` and `study.png` in the study dir (docs/study.md has a full run).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from studies import metrics, report
from studies.arms import TOY_ARMS, Arm, ArmResult, compose_train, run_arms, toy_arms, train_run
from studies.config import ImplantConfig, StudyConfig, SuppressionConfig
from studies.keys import SuppressionKey


def arm_overrides(arm: Arm, lr: float | None, seed: int, out_dir: Path, extra: Sequence[str], quick: int | None) -> tuple[list[str], Path]:
    """One arm's train.py overrides and run dir <out_dir>/<arm>[/lr<lr>]/seed<seed>."""
    overrides = list(arm.overrides)
    run_dir = out_dir / arm.name / f"seed{seed}"
    if lr is not None:  # a point of the arm's LR grid: its own run dir, and this LR instead of the arm's
        overrides = [o for o in overrides if not o.startswith("optimizer.lr=")] + [f"optimizer.lr={lr}"]
        run_dir = out_dir / arm.name / f"lr{lr:g}" / f"seed{seed}"
    overrides += [
        *extra,
        f"seed={seed}",
        f"paths.output_dir={run_dir}",
        "logger=none",
        "export=false",  # the study needs metrics, not 11 x 3 checkpoints
        "evaluate.validation_task_metric=false",
        "~callbacks.checkpoint",
    ]
    if quick:
        overrides.append(f"trainer.max_steps={quick}")
    return overrides, run_dir


def run_arm(name: str, seed: int, out_dir: Path, extra: Sequence[str], quick_steps: int | None, lr: float | None = None) -> dict:
    """One arm, one seed: an ordinary train.py run, reused when it finished under the same settings."""
    overrides, run_dir = arm_overrides(Arm(name, TOY_ARMS[name], (seed,), name), lr, seed, Path(out_dir), extra, quick_steps)
    return train_run(overrides, run_dir)


def base_metrics(extra: Sequence[str]) -> dict:
    """The untrained model's task metric and retention, in the shape of a run's metrics.json."""
    from loki.eval import forgetting_report, run_retention, run_task_eval
    from loki.models import load_model_and_tokenizer

    cfg = compose_train(list(extra))
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    with tempfile.TemporaryDirectory() as reference:  # KL against itself: 0, as it should be
        retention = run_retention(model, tokenizer, cfg.eval, reference_dir=reference, stage="before")
    return {
        "task_metrics": run_task_eval(model, tokenizer, cfg.task.eval),
        "retention": {"before": retention, "after": retention},
        "forgetting": forgetting_report(retention, retention),
        "trainable": {"trainable_effective": 0},
    }


def random_ranking(extra: Sequence[str]) -> dict:
    """A reranking task's metrics under a uniformly random candidate order (loki.toy.baseline), as a run's metrics."""
    from loki.toy.baseline import random_ranking_metrics

    cfg = compose_train(list(extra))
    return {"task_metrics": random_ranking_metrics(cfg.task.eval, shuffles=100)}


def suppression(extra: Sequence[str], sup: SuppressionConfig) -> list[tuple[SuppressionKey, dict]]:
    """Retention after zeroing the KVA-lowest, KVA-highest or random rows (per layer, k = floor(q D)): each
    measurement's key and its study.json row {q, rows, before, after}."""
    from loki import attribution
    from loki.eval import run_retention
    from loki.models import load_model_and_tokenizer
    from loki.store import ScoreStore
    from studies.suppression import picks, retention_after_zeroing

    cfg = compose_train(list(extra))
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    store_dir = attribution.default_store(cfg)
    if not ScoreStore.exists(store_dir):  # no training arm ran first: analyse now, as train.py would
        attribution.run(cfg, model, tokenizer, trainer_kwargs={"accelerator": "cpu", "devices": 1}, progress=False)
    reference = tempfile.mkdtemp(prefix="loki-suppression-")  # the intact model's distributions, for the KL
    base = run_retention(model, tokenizer, cfg.eval, reference_dir=reference, stage="before")
    intact = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    try:
        for key, _seed, positions in picks({cfg.kva.variant: ScoreStore(store_dir)}, sup.qs, sup.scores, sup.random_seeds):
            after = retention_after_zeroing(model, tokenizer, cfg.eval, reference, intact, positions())
            rows.append((key, {"q": key.q, "rows": key.toy_rows, "before": base, "after": after}))
    finally:
        model.load_state_dict(intact)
    return rows


def graded_drop(run: dict, graded: str) -> float:
    """Drop of the graded measure (mean log-prob of the right answer) in nats: before - after, >= 0 = loss.

    Absolute, not relative: a strong base model's log-prob is near 0, so a ratio would explode."""
    return metrics.find(metrics.retention(run, "before"), graded) - metrics.find(metrics.retention(run, "after"), graded)


def grid_table(grids: dict[str, ArmResult], task_metric: str, graded: str = "logprob") -> str:
    """Markdown: each grid arm's first-seed runs per LR (chosen LR in bold), then forgetting at an equal task metric.

    Every LR is a (task metric, forgetting) point. The level is the highest task metric that every grid arm
    reaches with some LR; each arm's entry is the least forgetting Avg among its points that reach it, so a
    method is not judged by where its LR happened to land."""
    rows = []
    for name, result in grids.items():
        for lr in sorted(result.grid_runs):
            run, mark = result.grid_runs[lr], "**" if lr == result.lr else ""
            rows.append([name, f"{mark}{lr:g}{mark}", f"{metrics.val_loss(run):.4f}", f"{metrics.task_metric(run, task_metric):.4f}",
                         f"{metrics.forgetting_avg(run):.1f}", f"{graded_drop(run, graded):.4f}"])
    lines = [f"LR grid (first seed; chosen by the lowest validation loss; {task_metric} shown, not used to choose)", "",
             *report.table(["arm", "lr", "val loss", f"task {task_metric}", "forgetting Avg (acc, %)", "logprob drop (nats)"], "lrrrrr", rows)]
    curves = {name: [(metrics.task_metric(run, task_metric), lr) for lr, run in result.grid_runs.items()] for name, result in grids.items()}
    level = report.equal_task_level(curves)
    rows = []
    for name, result in grids.items():
        _, lr = report.cheapest_reaching([(task, metrics.forgetting_avg(result.grid_runs[lr]), lr) for task, lr in curves[name]], level)
        run = result.grid_runs[lr]
        rows.append([name, f"{lr:g}", f"{metrics.task_metric(run, task_metric):.4f}", f"{metrics.forgetting_avg(run):.1f}", f"{graded_drop(run, graded):.4f}"])
    lines += ["", f"Forgetting at an equal task metric: {task_metric} >= {level:.4f} (the highest level every grid arm reaches)", "",
              *report.table(["arm", "lr", "task", "forgetting Avg (acc, %)", "logprob drop (nats)"], "lrrrr", rows)]
    return "\n".join(lines)


def summarise(runs: dict[str, list[dict]], supp: list[tuple[SuppressionKey, dict]], task_metric: str, graded: str) -> tuple[str, dict]:
    """Markdown tables (training arms; suppression) and the same numbers as study.json's `table`."""
    summary, rows = {}, []
    for name, results in runs.items():
        entry = {
            "task": report.mean_std([metrics.task_metric(r, task_metric) for r in results]),
            "graded_after": report.mean_std([metrics.find(metrics.retention(r), graded) for r in results if r.get("retention")]),
            "acc_after": report.mean_std([metrics.find(metrics.retention(r), "acc") for r in results if r.get("retention")]),
            "forgetting": report.mean_std([metrics.forgetting_avg(r) for r in results if r.get("forgetting")]),
            "graded_forgetting": report.mean_std([graded_drop(r, graded) for r in results if r.get("retention")]),
            "trainable": metrics.trainable(results[0]) if results else None,
            "seeds": len(results),
        }
        summary[name] = entry
        rows.append([name, "-" if entry["trainable"] is None else entry["trainable"],
                     *(report.spread(entry[k]) for k in ("task", "graded_after", "acc_after", "forgetting", "graded_forgetting"))])
    lines = report.table(["method", "trainable params", f"task {task_metric}", f"retention {graded} after", "retention acc after",
                          "forgetting Avg (acc, %)", f"{graded} drop (nats)"], "lrrrrrr", rows)
    if supp:
        before = metrics.find(supp[0][1]["before"], graded)
        grouped: dict[SuppressionKey, list[dict]] = {}
        for key, row in supp:
            grouped.setdefault(key, []).append(row)
        rows = []
        for key, group in grouped.items():
            g = report.mean_std([metrics.find(r["after"], graded) for r in group])
            a = report.mean_std([metrics.find(r["after"], "acc") for r in group])
            summary[key.toy_label] = {"graded": g, "acc": a}
            rows.append([f"{key.q:g}", "random" if key.kind == "random" else f"KVA-{key.kind} ({key.score})", report.spread(g), report.spread(a)])
        lines += ["", f"Suppression (no training): retention {graded} after zeroing k = floor(q D) rows per layer; before = {before:.4f}", "",
                  *report.table(["q", "zeroed rows", f"retention {graded}", "retention acc"], "rlrr", rows)]
    return "\n".join(lines), summary


def plot(summary: dict, path: Path, task_metric: str) -> Path:
    """Task metric against forgetting (graded drop), one point per arm; the random ranking as a level."""
    plt, fig, (ax,) = report.figure(1, (7, 5))
    points = [(name, row["graded_forgetting"], row["task"], "o" if name.startswith(("loki", "global", "layer", "random")) else "s")
              for name, row in summary.items() if "task" in row and not math.isnan(row["task"][0])]
    report.tradeoff_plot(ax, points, plt.cm.tab20)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("forgetting: retention log-prob drop (nats, symlog; lower is better)")
    ax.set_ylabel(f"task {task_metric} (higher is better)")
    ax.set_title("Toy study: task metric against forgetting (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="best")
    return report.save(plt, fig, path, dpi=120)


def run(study: StudyConfig) -> dict:
    """Run the arms and the suppression check; write study.md / study.json / study.png under `study.out`."""
    imp = study.implant
    names = list(TOY_ARMS) if imp.arms is None else list(imp.arms)
    grid = {name: lrs for name, lrs in imp.lr_grid.items() if name in names}
    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(study.threads))
    started = time.time()
    overrides = list(study.overrides)
    runs = {"base (no training)": [base_metrics(overrides)]}
    if (compose_train(overrides).task.eval or {}).get("kind") == "reranker":  # the chance level of the task metric
        runs["random ranking"] = [random_ranking(overrides)]

    def one_run(arm: Arm, lr: float | None, seed: int) -> dict:
        return train_run(*arm_overrides(arm, lr, seed, out, [*overrides, *imp.overrides], imp.max_steps))

    results = run_arms(toy_arms(names, imp.seeds, grid), one_run, study.select_lr_by)
    runs.update({name: result.runs for name, result in results.items()})
    supp = suppression(overrides, study.suppression) if study.suppression.enabled else []
    text, summary = summarise(runs, supp, study.task_metric, study.graded)
    grids = {name: result for name, result in results.items() if name in grid}
    if grids:
        text += "\n\n" + grid_table(grids, study.task_metric, study.graded)
    (out / "study.md").write_text(text + "\n")
    report.write_json(out / "study.json", {"table": summary, "suppression": [row for _, row in supp], "lr_grid": {name: grid_record(r, study) for name, r in grids.items()}})
    if any("task" in row for row in summary.values()):
        plot(summary, out / "study.png", study.task_metric)
    print(text)
    print(f"study dir: {out}  ({time.time() - started:.0f} s)")
    return summary


def grid_record(result: ArmResult, study: StudyConfig) -> dict:
    """study.json's record of an arm's LR grid (the format earlier studies wrote)."""
    runs = result.grid_runs
    return {"chosen": result.lr, "val_loss": {lr: r.get("val_loss") for lr, r in runs.items()},
            "task": {lr: metrics.task_metric(r, study.task_metric) for lr, r in runs.items()},
            "forgetting": {lr: metrics.forgetting_avg(r) for lr, r in runs.items()},
            "graded_forgetting": {lr: graded_drop(r, study.graded) for lr, r in runs.items()}}


def run_study(out: str | Path, seeds: Sequence[int] = (0, 1, 2), arms: Sequence[str] | None = None, quick: int | None = None,
              suppression_check: bool = True, threads: int = 1, task_metric: str = "ndcg@10", graded: str = "logprob",
              overrides: Sequence[str] = (), lr_grid: dict[str, Sequence[float]] | None = None) -> dict:
    """The toy study from Python, with conf/study.yaml's top-level knobs as arguments."""
    return run(StudyConfig(
        kind="toy", name="toy", out=str(out), threads=threads, overrides=list(overrides), task_metric=task_metric, graded=graded,
        suppression=SuppressionConfig(enabled=suppression_check, random_seeds=list(seeds)),
        implant=ImplantConfig(arms=None if arms is None else list(arms), seeds=list(seeds),
                              lr_grid={k: list(v) for k, v in (lr_grid or {}).items()}, max_steps=quick)))
