"""Seconds per frontier point on SmolLM2-135M-Instruct: today's path (an ordinary train.py run with the
real-model study's settings, measuring everything, writing a checkpoint and an export) against the
frontier's path (the same training, evaluated in memory on what the frontier's table reads), by stage,
and an interpolation point (no training) of the frontier's path.

    python benchmarks/bench_frontier.py [--steps 30] [--texts 32] [--threads 1] [--impl hook,rows,rows+labelled]

Both paths train the same LoKI run (q = 0.1, lr 1e-3, 30 steps at batch 8 on 30 invented facts) and read
the same held-out texts for KL and LM loss. The KVA store and the base model's measurements are made
first (once, untimed), as they are cached in practice. Today's path also measures letter and cloze MMLU
(57 questions each, at chance on this model), writes Lightning's checkpoint and exports the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch


class Clock:
    """Seconds spent inside wrapped functions, by stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def wrap(self, owner, attr: str, name: str):
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        return original


def overrides(steps: int, texts: int) -> list[str]:
    return [
        "model=smollm135m", "task=toy_facts", "task.facts.lands=5", "data.per_subject=2", "eval.batch_size=1",
        "loki.q=0.1", "optimizer.lr=1e-3", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
        "++trainer.enable_progress_bar=false",
        # the real-model study's retention (conf/study/smollm135m.yaml): 57 letter and cloze questions, 32 texts
        "eval.benchmarks.mmlu.per_subject=1", "eval.benchmarks.mmlu_cloze.per_subject=1",
        "eval.benchmarks.mmlu_kl.per_subject=1", f"eval.benchmarks.mmlu_kl.max_samples={texts}",
        "eval.benchmarks.mmlu_kl.prompt=text", "eval.benchmarks.mmlu_kl.chat_template=false", "eval.benchmarks.mmlu_kl.positions=all",
        "eval.benchmarks.mmlu_lm_loss.per_subject=1", f"eval.benchmarks.mmlu_lm_loss.max_samples={texts}",
    ]


def todays_path(steps: int, texts: int, out: Path) -> dict[str, float]:
    """An ordinary train.py run as the real-model study ran its points: checkpoint, export, every measure."""
    import lightning.pytorch as pl

    from loki import recipe
    from loki.tasks import Task
    from studies.frontier.run import compose_train

    clock = Clock()
    restore = [
        (pl.Trainer, "fit", clock.wrap(pl.Trainer, "fit", "train (Trainer.fit)")),
        (recipe, "evaluate_retention", clock.wrap(recipe, "evaluate_retention", "retention")),
        (Task, "evaluate", clock.wrap(Task, "evaluate", "task")),
    ]
    import loki.implant

    restore.append((loki.implant, "export_model", clock.wrap(loki.implant, "export_model", "export")))
    try:
        cfg = compose_train([*overrides(steps, texts), f"paths.output_dir={out}", "logger=none"])
        recipe.evaluate_retention(cfg, recipe.setup(cfg), stage="before")  # the base, cached as in practice (untimed)
        clock.seconds.clear()
        with clock.stage("total"):
            recipe.run(cfg)
    finally:
        for owner, attr, original in restore:
            setattr(owner, attr, original)
    return clock.seconds


def frontier_path(steps: int, texts: int, out: Path, impl: str = "hook") -> tuple[dict[str, float], dict[str, float]]:
    """The frontier's unit: one run, evaluated in memory, and one interpolation point of it. `impl`:
    LoKI's implementation (rows: only the [k, F] blocks are parameters; the same method), optionally with
    `+labelled`: the training loss with the output head on labelled positions only (loss.logits=labelled,
    the same loss), and `+bf16`: training under bf16 autocast (trainer.precision=bf16-mixed; fp32 master
    rows, so not the same arithmetic: a different run, not a faster copy of the same one)."""
    from studies.frontier.run import Frontier, FrontierConfig, RunKey

    impl, *options = impl.split("+")
    method_overrides = ["loki.q=0.1", f"loki.impl={impl}"] + (["loss.logits=labelled"] if "labelled" in options else [])
    method_overrides += ["trainer.precision=bf16-mixed"] if "bf16" in options else []

    extra = [o for o in overrides(steps, texts)[2:] if not o.startswith(("loki.q", "optimizer.lr", "trainer.", "++trainer"))]
    extra = [o for o in extra if "mmlu." not in o and "mmlu_cloze." not in o]  # letter and cloze: opt-in, off here
    extra += ["eval.benchmarks.mmlu.enabled=false", "eval.benchmarks.mmlu_cloze.enabled=false"]
    frontier = FrontierConfig(name="bench", model="smollm135m", task="toy_facts", steps=steps, seeds=[0], alphas=[0.5],
                              interpolate_top=1, overrides=extra, methods=[{"name": "loki-q0.1", "overrides": method_overrides, "lrs": [1e-3]}])
    runner = Frontier(frontier, out)
    runner.base()  # the base's measurements: once per frontier (untimed, as cached in practice)
    runner.base_state()
    started = time.perf_counter()
    trained, half = runner.run_unit(RunKey("loki-q0.1", 1e-3, 0), (0.5,))
    total = time.perf_counter() - started
    point = {"train (Trainer.fit and setup)": trained["seconds_train"], "task": trained["seconds_eval"]["task"],
             "retention": trained["seconds_eval"]["retention"]}
    interpolation = {"task": half["seconds_eval"]["task"], "retention": half["seconds_eval"]["retention"]}
    interpolation["total"] = sum(interpolation.values())
    point["total"] = total - interpolation["total"]
    return point, interpolation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the run")
    parser.add_argument("--texts", type=int, default=32, help="held-out texts of the KL and LM-loss measures")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--impl", default="hook", help="LoKI implementations of the frontier path, comma-separated (hook,rows; +labelled: loss.logits=labelled; +bf16: trainer.precision=bf16-mixed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        old = todays_path(args.steps, args.texts, Path(tmp) / "today")
        new = {impl: frontier_path(args.steps, args.texts, Path(tmp) / f"frontier-{impl}", impl) for impl in impls}
    stages = ["train (Trainer.fit)", "train (Trainer.fit and setup)", "retention", "task", "export", "total"]
    print(f"SmolLM2-135M-Instruct (Q4_1, dequantized), LoKI q=0.1 lr 1e-3, {args.steps} steps at batch 8, {args.texts} held-out texts, "
          f"{args.threads} thread(s); seconds per point (today's path: loki.impl=hook)")
    columns = ["today's path"] + [f"frontier point ({i})" for i in impls] + [f"interpolation point ({i})" for i in impls]
    print("| stage | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for stage in stages:
        cells = [old.get(stage)] + [new[i][0].get(stage) for i in impls] + [new[i][1].get(stage) for i in impls]
        if all(c is None for c in cells):
            continue
        print(f"| {stage} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    ratios = [1.0] + [new[i][0]["total"] / old["total"] for i in impls] + [new[i][1]["total"] / old["total"] for i in impls]
    print("| ratio to today's point | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    for impl in impls:
        point, interp = new[impl]
        print(f"impl={impl}: a frontier point is {old['total'] / point['total']:.2f}x faster than today's; "
              f"an interpolation point costs {interp['total'] / point['total']:.2f} of a frontier point")
    print(json.dumps({"today": old, **{f"frontier-{i}": new[i][0] for i in impls}, **{f"interpolation-{i}": new[i][1] for i in impls}}))


if __name__ == "__main__":
    main()
