"""The toy study: does LoKI forget less than full fine-tuning and LoRA, and does KVA find rows that matter?

    python -m loki.study                             # full study: every arm x 3 seeds, + suppression check
    python -m loki.study quick=40 'seeds=[0]'        # CI-sized: fewer steps, one seed
    python -m loki.study 'overrides=[model.seed=1]'  # train.py overrides for every run

Every arm is an ordinary `train.py` run (composed with Hydra's compose API, run in-process through
`loki.recipe.run`), so the study measures exactly what users get. The suppression check (the paper's
Figure 3 idea) zeroes the rows that KVA marks highest, lowest, or random rows, without any training,
and measures retention with the graded measure. Writes `study.md`, `study.json` and `study.png` in the
output dir.
"""

from __future__ import annotations

import sys
import tempfile
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# arm name -> Hydra overrides of train.yaml (q=0.1 is the ablations' reference point, as in the paper)
ARMS: dict[str, list[str]] = {
    "full": ["loki=off"],
    "lora-r16": ["loki=off", "lora=r16", "optimizer.lr=${model.loki_lr}"],  # LoRA, like LoKI, wants a larger step
    "loki-q0.05": ["loki.q=0.05"],
    "loki-q0.1": ["loki.q=0.1"],
    "loki-q0.2": ["loki.q=0.2"],
    "loki-q0.3": ["loki.q=0.3"],
    "loki-q0.1-abs": ["loki.q=0.1", "loki.score=abs"],
    "global_lowest-q0.1": ["loki.q=0.1", "loki.strategy=global_lowest"],
    "global_highest-q0.1": ["loki.q=0.1", "loki.strategy=global_highest"],
    "layer_balanced_highest-q0.1": ["loki.q=0.1", "loki.strategy=layer_balanced_highest"],
    "random-q0.1": ["loki.q=0.1", "loki.strategy=random"],
}
SUPPRESSION_QS = (0.05, 0.1, 0.2, 0.3)


def compose_train(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir

    import loki.recipe  # noqa: F401  registers the ${method:} resolver

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_arm(name: str, seed: int, out_dir: Path, extra: Sequence[str], quick_steps: int | None) -> dict:
    from loki import recipe

    run_dir = out_dir / name / f"seed{seed}"
    overrides = [
        *ARMS[name],
        *extra,
        f"seed={seed}",
        f"paths.output_dir={run_dir}",
        "logger=none",
        "export=false",  # the study needs metrics, not 11 x 3 checkpoints
        "evaluate.validation_task_metric=false",
        "~callbacks.checkpoint",
    ]
    if quick_steps:
        overrides.append(f"trainer.max_steps={quick_steps}")
    cfg = compose_train(overrides)
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():  # resumable: a finished arm is not rerun
        return json.loads(metrics_file.read_text())
    return recipe.run(cfg)


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


def zero_rows(model: torch.nn.Module, positions: list[list[int]]) -> None:
    """Suppress knowledge vectors: set the selected rows of every down_proj.weight to zero (in place)."""
    from loki import arch

    with torch.no_grad():
        for proj, rows in zip(arch.down_projs(model), positions):
            if rows:
                proj.weight[torch.as_tensor(rows, dtype=torch.long)] = 0.0


def suppression(extra: Sequence[str], seeds: Sequence[int], qs: Sequence[float] = SUPPRESSION_QS) -> list[dict]:
    """Retention after zeroing the KVA-lowest, KVA-highest or random rows (per layer, k = floor(q D))."""
    from loki import analysis
    from loki.eval import run_retention
    from loki.models import load_model_and_tokenizer
    from loki.select import select_positions
    from loki.store import ScoreStore

    cfg = compose_train(list(extra))
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    store_dir = analysis.default_store(cfg)
    if not ScoreStore.exists(store_dir):  # no training arm ran first: analyse now, as train.py would
        analysis.run(cfg, model, tokenizer, trainer_kwargs={"accelerator": "cpu", "devices": 1}, progress=False)
    store = ScoreStore(store_dir)
    reference = tempfile.mkdtemp(prefix="loki-suppression-")  # the intact model's distributions, for the KL
    base = run_retention(model, tokenizer, cfg.eval, reference_dir=reference, stage="before")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for q in qs:
        picks = {
            "lowest": [select_positions(store.iter_chunks(), q, strategy="layer_balanced")],
            "highest": [select_positions(store.iter_chunks(), q, strategy="layer_balanced_highest")],
            "lowest-abs": [select_positions(store.iter_chunks(), q, strategy="layer_balanced", score="abs")],
            "highest-abs": [select_positions(store.iter_chunks(), q, strategy="layer_balanced_highest", score="abs")],
            "random": [select_positions(store.iter_chunks(), q, strategy="random", seed=s) for s in seeds],
        }
        for kind, position_sets in picks.items():
            for positions in position_sets:
                model.load_state_dict(state)
                zero_rows(model, positions)
                after = run_retention(model, tokenizer, cfg.eval, reference_dir=reference, stage="after")
                rows.append({"q": q, "rows": kind, "before": base, "after": after})
    model.load_state_dict(state)
    return rows


def _primary(metrics: dict, key_suffix: str) -> float:
    for key, value in (metrics or {}).items():
        if key.endswith(key_suffix):
            return float(value)
    return float("nan")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict[str, list[dict]], supp: list[dict], task_metric: str, graded: str) -> tuple[str, dict]:
    """Markdown tables (training arms; suppression) and the same numbers as a dict."""
    table = {}
    lines = [
        f"| method | trainable params | task {task_metric} | retention {graded} after | retention acc after | forgetting Avg (acc, %) | {graded} drop (nats) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in runs.items():
        task = _mean_std([_primary(r.get("task_metrics"), task_metric) for r in results])
        after = [r["retention"]["after"] for r in results if r.get("retention")]
        before = [r["retention"]["before"] for r in results if r.get("retention")]
        graded_after = _mean_std([_primary(a, "/" + graded) for a in after])
        acc_after = _mean_std([_primary(a, "/acc") for a in after])
        avg = _mean_std([float(r["forgetting"]["avg"]) for r in results if r.get("forgetting")])
        graded_drop = _mean_std([_graded_forgetting(b, a, graded) for b, a in zip(before, after)])
        trainable = results[0].get("trainable", {}).get("trainable_effective") if results else None
        table[name] = {"task": task, "graded_after": graded_after, "acc_after": acc_after, "forgetting": avg,
                       "graded_forgetting": graded_drop, "trainable": trainable, "seeds": len(results)}
        lines.append(
            f"| {name} | {trainable if trainable is not None else '-'} | {_fmt(task)} | {_fmt(graded_after)} | {_fmt(acc_after)} | {_fmt(avg)} | {_fmt(graded_drop)} |"
        )
    if supp:
        before = _primary(supp[0]["before"], "/" + graded)
        lines += ["", f"Suppression (no training): retention {graded} after zeroing k = floor(q D) rows per layer; before = {before:.4f}", "",
                  "| q | zeroed rows | retention " + graded + " | retention acc |", "|---:|---|---:|---:|"]
        grouped: dict[tuple, list[dict]] = {}
        for row in supp:
            grouped.setdefault((row["q"], row["rows"]), []).append(row)
        for (q, kind), group in grouped.items():
            g = _mean_std([_primary(r["after"], "/" + graded) for r in group])
            a = _mean_std([_primary(r["after"], "/acc") for r in group])
            table[f"suppress-{kind}-q{q:g}"] = {"graded": g, "acc": a}
            label = "random" if kind == "random" else f"KVA-{kind.replace('-abs', '')} ({'abs' if kind.endswith('abs') else 'signed'})"
            lines.append(f"| {q:g} | {label} | {_fmt(g)} | {_fmt(a)} |")
    return "\n".join(lines), table


def _graded_forgetting(before: dict, after: dict, graded: str) -> float:
    """Drop of the graded measure (mean log-prob of the right answer) in nats: before - after, >= 0 = loss.

    Absolute, not relative: a strong base model's log-prob is near 0, so a ratio would explode."""
    b, a = _primary(before, "/" + graded), _primary(after, "/" + graded)
    return b - a


def _fmt(pair: tuple[float, float]) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if std else f"{mean:.4f}"


def plot(table: dict, path: Path, task_metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    rows = [(name, row) for name, row in table.items() if "task" in row and not math.isnan(row["task"][0])]
    for index, (name, row) in enumerate(rows):
        (x, xs), (y, ys) = row["graded_forgetting"], row["task"]
        marker = "s" if not name.startswith(("loki", "global", "layer", "random")) else "o"
        ax.errorbar(x, y, xerr=xs, yerr=ys, fmt=marker, capsize=3, label=name, color=plt.cm.tab20(index % 20))
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("forgetting: retention log-prob drop (nats, symlog; lower is better)")
    ax.set_ylabel(f"task {task_metric} (higher is better)")
    ax.set_title("Toy study: task metric against forgetting (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_study(
    out: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    arms: Sequence[str] | None = None,
    quick: int | None = None,
    suppression_check: bool = True,
    threads: int = 1,
    task_metric: str = "ndcg@10",
    graded: str = "logprob",
    overrides: Sequence[str] = (),
) -> dict:
    """Run the arms and the suppression check; write study.md / study.json / study.png under `out`."""
    from loki.errors import LokiError

    arms = list(ARMS) if arms is None else list(arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise LokiError(f"arms must be a list of {', '.join(ARMS)}, got {unknown[0]!r}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(threads))
    started = time.time()
    runs = {"base (no training)": [base_metrics(overrides)]}
    runs.update({name: [run_arm(name, seed, out, overrides, quick) for seed in seeds] for name in arms})
    supp = suppression(overrides, seeds) if suppression_check else []
    text, table = summarise(runs, supp, task_metric, graded)
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps({"table": table, "suppression": supp}, indent=2, default=float))
    if any("task" in row for row in table.values()):
        plot(table, out / "study.png", task_metric)
    print(text)
    print(f"study dir: {out}  ({time.time() - started:.0f} s)")
    return table


@hydra.main(version_base="1.3", config_path="../conf", config_name="study")
def main(cfg: DictConfig) -> None:
    from loki.errors import LokiError

    try:
        run_study(
            out=cfg.out or Path(cfg.paths.output_dir),
            seeds=list(cfg.seeds),
            arms=None if cfg.arms is None else list(cfg.arms),
            quick=cfg.quick,
            suppression_check=cfg.suppression,
            threads=cfg.threads,
            task_metric=cfg.task_metric,
            graded=cfg.graded,
            overrides=list(cfg.overrides),
        )
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
